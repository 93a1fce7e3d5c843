"""Before -> after benchmark of a change to the reconstruction (run by hand), e.g. the differentiable D-SSIM
term of the 3DGS loss: each arm is a source tree (``--before REV`` and ``--after REV``, default HEAD, are
extracted with ``git archive``, ``revision.py``) run in its own process, one after the other, same machine, same threads.

Per arm: ``scripts/benchmarks/gaussians.py --skip-raster`` of that tree (16-view bunny orbit at 256²,
``configs/recon/gaussians.yaml``: PSNR / SSIM of the training views and the M = 16 / 32 interpolated views
against the renderer's ground truth) and, with ``--demo``, ``hi3d demo`` (CPU config, M = 16) for the
Chamfer distance and volume IoU.

    .venv/bin/python scripts/benchmarks/ssim_loss.py --before 72ac23b --after 5d2e063 [--demo] [--threads 1] [--out DIR]

Writes ``OUT/ssim_loss.json`` and ``OUT/ssim_loss.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from revision import source_tree


def run_arm(tree: Path, out: Path, threads: int, demo: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    py = sys.executable
    t = time.perf_counter()
    subprocess.run([py, str(tree / "scripts/benchmarks/gaussians.py"), "--skip-raster", "--threads", str(threads),
                    "--out", str(out), "progress=false"], env=env, check=True, cwd=tree)
    res = {"gaussians": json.loads((out / "gaussians.json").read_text())["fit"], "wall_s": time.perf_counter() - t}
    if demo:
        t = time.perf_counter()
        subprocess.run([py, "-m", "hi3d.cli", "demo", "--out", str(out / "demo")], env=env, check=True, cwd=tree)
        res["demo"] = json.loads((out / "demo" / "metrics.json").read_text())
        res["demo_wall_s"] = time.perf_counter() - t
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision of the baseline")
    p.add_argument("--after", default="HEAD", help="git revision of the change")
    p.add_argument("--out", default="outputs/benchmarks/ssim_loss")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--demo", action="store_true", help="also run hi3d demo per arm (Chamfer / IoU)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    res = {"before": args.before, "after": args.after, "threads": args.threads, "load_avg_start": os.getloadavg()}
    res["arms"] = {}
    for arm, rev in (("before", args.before), ("after", args.after)):
        with source_tree(rev) as tree:
            res["arms"][arm] = run_arm(tree, out / arm, args.threads, args.demo)
    res["load_avg_end"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    (out / "ssim_loss.json").write_text(json.dumps(res, indent=1))
    lines = [f"# before ({args.before}) -> after ({args.after}), {args.threads} thread(s)", "",
             "| arm | views | PSNR | SSIM | Gaussians | fit s |", "|---|---|---|---|---|---|"]
    for arm, r in res["arms"].items():
        g = r["gaussians"]
        lines += [f"| {arm} | {k} | {v['psnr']:.2f} | {v['ssim']:.4f} | {g['gaussians']} | {g['fit_wall_s']:.0f} |"
                  for k, v in g["views"].items()]
        if "demo" in r:
            lines.append(f"| {arm} | demo mesh | Chamfer {r['demo']['chamfer']:.4f} | IoU {r['demo']['volume_iou']:.3f} | | |")
    lines += ["", f"load average start/end: {res['load_avg_start']} / {res['load_avg_end']}"]
    (out / "ssim_loss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
