"""Demo benchmark (run by hand): ``hi3d demo`` (bunny, CPU config: render -> 3DGS -> NeuS -> mesh -> metrics)
from a baseline git revision and from the working tree, one after the other in one run, idle and, for the
working tree, again beside one CPU-bound process (a Python busy loop). Reports each stage's time, the wall
time, Chamfer / IoU, and the speed-up over the baseline.

    .venv/bin/python scripts/benchmarks/demo.py --baseline REV [--out outputs/benchmarks] [--no-busy]

The baseline is extracted with ``git archive`` (``revision.py``) into a temporary folder and run with this venv's
Python (``PYTHONPATH`` = that tree); every demo runs in its own process without ``OMP_NUM_THREADS``, in a
fresh output folder. Writes ``OUT/demo.json`` and ``OUT/demo.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from revision import ROOT, describe, source_tree


def run_demo(tree: Path, out: Path, busy: bool, obj: str) -> dict:
    if out.exists():
        shutil.rmtree(out)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LP_NUM_THREADS")}
    env["PYTHONPATH"] = str(tree)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        load = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hi3d.cli", "demo", "--out", str(out), "--object", obj, "--no-progress",
                        "gaussians.progress=false"], cwd=tree, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    m = json.loads((out / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "load_avg_1min_at_start": round(load, 2), "chamfer": m["chamfer"],
            "volume_iou": m["volume_iou"], "stages_s": {k: round(v, 1) for k, v in m["stage_seconds"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision of the baseline (e.g. a commit before a change)")
    parser.add_argument("--out", default="outputs/benchmarks")
    parser.add_argument("--object", default="bunny")
    parser.add_argument("--no-busy", action="store_true", help="skip the run beside a busy process")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    work = out / "demo_runs"
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"object": args.object, "cpu_count": os.cpu_count(), "baseline": describe(args.baseline),
                     "current": describe(), "runs": {}}
    with source_tree(args.baseline) as base_tree:
        plan = [("baseline", base_tree, False), ("current", ROOT, False)] + ([] if args.no_busy else [("current", ROOT, True)])
        for name, tree, busy in plan:
            key = f"{name}/{'beside_busy' if busy else 'idle'}"
            results["runs"][key] = run_demo(tree, work / key.replace("/", "_"), busy, args.object)
            print(key, results["runs"][key], flush=True)
    r = results["runs"]
    results["speedup_idle"] = round(r["baseline/idle"]["wall_s"] / r["current/idle"]["wall_s"], 2)
    if "current/beside_busy" in r:
        results["load_ratio"] = round(r["current/beside_busy"]["wall_s"] / r["current/idle"]["wall_s"], 2)
    from hi3d.io import write_bytes, write_json

    write_json(out / "demo.json", results)
    stages = list(r["current/idle"]["stages_s"])
    lines = [f"# Demo benchmark: hi3d demo --object {args.object} (CPU config), {os.cpu_count()} CPUs", "",
             f"baseline {results['baseline']}, current {results['current']}", "",
             "| run | wall (s) | " + " | ".join(stages) + " | Chamfer | IoU | load avg at start |",
             "|---|---|" + "---|" * len(stages) + "---|---|---|"]
    for key, v in r.items():
        lines.append(f"| {key} | {v['wall_s']} | " + " | ".join(str(v["stages_s"].get(s, "")) for s in stages)
                     + f" | {v['chamfer']:.4f} | {v['volume_iou']:.3f} | {v['load_avg_1min_at_start']} |")
    lines += ["", f"speed-up (idle, baseline / current wall): {results['speedup_idle']}x"]
    if "load_ratio" in results:
        lines.append(f"current beside a busy process / idle: {results['load_ratio']}x")
    write_bytes(out / "demo.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
