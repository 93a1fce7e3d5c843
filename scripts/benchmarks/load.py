"""Load benchmark (run by hand): one short ``hi3d reconstruct`` of a real object (16 views at 128², small
schedule) with the machine as it is, and again beside one CPU-bound process (a Python busy loop), in one run;
for the auto thread policy (``num_threads=0``, ``hi3d.threads``) and, as the baseline, a fixed count (the old
behaviour: torch's default, one thread per core). Reports each stage's time and the loaded/unloaded ratio.

    .venv/bin/python scripts/benchmarks/load.py [--out outputs/benchmarks] [--object bunny] [--baseline-threads N]

Each reconstruct runs in its own process without ``OMP_NUM_THREADS``, as a user's would. Writes
``OUT/load.json`` and ``OUT/load.md`` (with the load average seen at each start: this benchmark compares
runs made minutes apart, so say how busy the machine was).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCHEDULE = ["gaussians.iterations=100", "gaussians.train_resolution=128", "gaussians.num_points=3000",
            "gaussians.densify_start=30", "gaussians.densify_stop=80", "gaussians.densify_every=25",
            "neus.iterations=80", "neus.checkpoint_every=80", "neus.level_every=8", "mesh.resolution=96",
            "mesh.texture_size=256", "turntable_views=4", "turntable_resolution=128"]


def reconstruct(orbit: Path, out: Path, threads: int, busy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LP_NUM_THREADS")}
    overrides = [f"gaussians.num_threads={threads}", f"neus.num_threads={threads}", f"mesh.num_threads={threads}"]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        load = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hi3d.cli", "reconstruct", str(orbit), "--out", str(out),
                        "--num-interp", "16", "--no-progress", "--config", "configs/recon/neus.yaml",
                        *SCHEDULE, *overrides], check=True, env=env, capture_output=True)
        wall = time.perf_counter() - start
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    stages = json.loads((out / "run.json").read_text())["stages"]
    return {"wall_s": round(wall, 1), "load_avg_1min_at_start": load,
            "stages_s": {k: v["wall_time_s"] for k, v in stages.items()}}


def main() -> None:
    from hi3d.data.orbit import save_orbit
    from hi3d.data.real_objects import resolve_object
    from hi3d.data.render import RenderConfig, render_orbit
    from hi3d.io import write_bytes, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/benchmarks")
    parser.add_argument("--object", default="bunny")
    parser.add_argument("--baseline-threads", type=int, default=os.cpu_count() or 1,
                        help="fixed thread count of the baseline (default: one per core, torch's default)")
    args = parser.parse_args()
    out = Path(args.out)
    work = out / "load_runs"
    orbit = work / "orbit"
    if not (orbit / "cameras.json").is_file():
        save_orbit(render_orbit(resolve_object(args.object), RenderConfig(num_views=16, resolution=128)), orbit)
    results: dict = {"object": args.object, "cpu_count": os.cpu_count(), "schedule": SCHEDULE, "runs": {}}
    for name, threads in (("auto", 0), (f"fixed_{args.baseline_threads}", args.baseline_threads)):
        for busy in (False, True):
            key = f"{name}/{'beside_busy' if busy else 'as_is'}"
            run_dir = work / key.replace("/", "_")
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            results["runs"][key] = reconstruct(orbit, run_dir, threads, busy)
            print(key, results["runs"][key], flush=True)
        r = results["runs"]
        results[f"{name}_ratio"] = round(r[f"{name}/beside_busy"]["wall_s"] / r[f"{name}/as_is"]["wall_s"], 2)
    write_json(out / "load.json", results)
    lines = ["# Load benchmark: hi3d reconstruct beside one CPU-bound process", "",
             f"{args.object}, 16 views at 128², M = 16, {os.cpu_count()} CPUs; schedule `{' '.join(SCHEDULE)}`", "",
             "| threads | as is (s) | beside busy (s) | ratio | load avg at starts | stages beside busy (s) |",
             "|---|---|---|---|---|---|"]
    for name in [k for k in results if k.endswith("_ratio")]:
        mode = name[:-len("_ratio")]
        a, b = results["runs"][f"{mode}/as_is"], results["runs"][f"{mode}/beside_busy"]
        lines.append(f"| {mode} | {a['wall_s']} | {b['wall_s']} | {results[name]} | "
                     f"{a['load_avg_1min_at_start']:.1f}, {b['load_avg_1min_at_start']:.1f} | "
                     + ", ".join(f"{k} {v:.1f}" for k, v in b["stages_s"].items()) + " |")
    write_bytes(out / "load.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
