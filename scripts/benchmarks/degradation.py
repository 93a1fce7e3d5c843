"""Benchmark the stage-2 degradation pipeline on this machine (run by hand).

    python scripts/benchmarks/degradation.py [--out outputs/benchmarks] [--repeats 3] [--threads 2]

Measures, in one run:
- frames/s of ``degrade_video`` on 16-frame videos at 1024² (round 1 at 1024², round 2 at 256·scale, final
  256², upsampled back to 1024²), against
  a baseline of the same two clean resizes alone (1024² -> 256² -> 1024²): the ratio is the cost of the
  degradations themselves;
- the share of a tiny stage-2 training step (``configs/stage2/tiny_cpu.yaml`` sizes: batch 2, 4 frames, 32²)
  spent degrading: step with on-the-fly degradation vs the same step given pre-degraded frames.
Writes ``degradation.json`` and ``degradation.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    from hi3d.data.degradation import DegradationConfig, _resize_clean, degrade_video
    from hi3d.io import write_bytes, write_json
    from hi3d.models.depth import DepthConfig
    from hi3d.models.stage1 import TinyConfig
    from hi3d.models.stage2 import Stage2Config
    from hi3d.training.stage2 import Stage2Task

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, args.frames, 3, args.size, args.size, generator=g)
    cfg = DegradationConfig()
    n = args.frames

    def clean_resizes():
        x = _resize_clean(video[0], (cfg.degrade_size, cfg.degrade_size))
        return _resize_clean(x, (args.size, args.size))

    seeds = iter(range(10**6))
    t_deg = timed(lambda: degrade_video(video, cfg, torch.Generator().manual_seed(next(seeds))), args.repeats)
    t_base = timed(clean_resizes, args.repeats)

    tcfg = Stage2Config(num_frames=4, resolution=32, tiny=TinyConfig(enabled=True), depth=DepthConfig(input_size=32))
    tcfg.degradation.degrade_size = 32
    task = Stage2Task(tcfg)
    opt = torch.optim.AdamW(task.unet.parameters(), lr=1e-4)
    batch = {"frames": torch.rand(2, 4, 3, 32, 32, generator=g) * 2 - 1, "elevation": torch.tensor([10.0, 20.0])}
    pre = dict(batch, degraded=task.degrade(batch, torch.Generator().manual_seed(1)) * 2 - 1)

    def step(b):
        loss = task.training_loss(task.unet, b, torch.Generator().manual_seed(next(seeds)))
        loss.backward()
        opt.step()
        opt.zero_grad()

    t_step = timed(lambda: step(batch), args.repeats * 3)
    t_step_pre = timed(lambda: step(pre), args.repeats * 3)
    t_tiny_deg = timed(lambda: task.degrade(batch, torch.Generator().manual_seed(next(seeds))), args.repeats * 3)

    res = {
        "video": f"{n} frames at {args.size}², round 1 at full size, final {cfg.degrade_size}²",
        "threads": args.threads,
        "degrade_s_per_video": t_deg, "degrade_frames_per_s": n / t_deg,
        "baseline_clean_resizes_s_per_video": t_base, "baseline_frames_per_s": n / t_base,
        "degrade_vs_baseline_time_ratio": t_deg / t_base,
        "tiny_step_s_with_degradation": t_step, "tiny_step_s_predegraded": t_step_pre,
        "tiny_degrade_s": t_tiny_deg,
        "tiny_step_share_of_degradation": max(0.0, t_step - t_step_pre) / t_step,
        "tiny_step_share_direct": t_tiny_deg / t_step,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "degradation.json", res)
    md = ["# Degradation benchmark", "", f"- {res['video']}, {args.threads} threads, median of {args.repeats}",
          f"- degrade: {t_deg:.3f} s/video = **{n / t_deg:.1f} frames/s**; baseline (two clean resizes): "
          f"{n / t_base:.1f} frames/s; degradation costs {t_deg / t_base:.1f}x the baseline",
          f"- tiny stage-2 step (batch 2 x 4 frames, 32²): {t_step:.3f} s with on-the-fly degradation, "
          f"{t_step_pre:.3f} s pre-degraded -> degradation share {res['tiny_step_share_of_degradation']:.1%} "
          f"(direct timing {t_tiny_deg:.3f} s = {res['tiny_step_share_direct']:.1%})", ""]
    write_bytes(args.out / "degradation.md", "\n".join(md).encode())
    print("\n".join(md))


if __name__ == "__main__":
    main()
