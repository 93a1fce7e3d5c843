#!/usr/bin/env python
"""Training benchmark, run by hand: tiny stage-1 training steps/s through the shared loop and data reading speed.

    python scripts/benchmarks/train.py [--config configs/stage1/tiny_cpu.yaml] [--steps 10] [--out outputs/benchmarks]

Baselines measured in the same run:
- training: a bare step (``task.training_loss`` + backward + AdamW, no accelerate/EMA/logging/checkpoints);
  the loop's steps/s (``run.json``, including its final checkpoint) is reported as a ratio to it.
- data: samples/s of ``OrbitDataset`` (one PNG per view) vs ``ShardOrbitDataset`` (tar shards).
The data are synthetic orbits (speed does not depend on content). Writes ``train.json`` and ``train.md``
under ``--out`` and adds ``training_tiny_cpu`` to ``stage1.json`` there.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from hi3d import cameras
from hi3d.config import load_config
from hi3d.data.datasets import OrbitDataset, ShardOrbitDataset, build_dataset, first_samples
from hi3d.data.orbit import Orbit, save_orbit
from hi3d.io import read_json, write_bytes, write_json
from hi3d.training.loop import train
from hi3d.training.stage1 import Stage1Task

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str):
    import sys

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def synthetic_orbits(root: Path, objects: int, views: int, size: int) -> None:
    g = torch.Generator().manual_seed(0)
    c2w, az, el = cameras.orbit_poses(views, 20.0)
    for k in range(objects):
        rgba = torch.rand(views, size, size, 4, generator=g)
        rgba[..., 3] = (rgba[..., 3] > 0.3).float()
        save_orbit(Orbit(rgba=rgba, c2w=c2w, K=cameras.intrinsics(size).expand(views, 3, 3), azimuth_deg=az,
                         elevation_deg=el, radius=torch.full((views,), 1.5, dtype=torch.float64)),
                   root / f"obj{k:03d}", sheet=False)


def bare_steps_per_s(cfg, steps: int) -> float:
    task = Stage1Task(cfg.model)
    batch = first_samples(build_dataset(cfg.data), cfg.train.batch_size)
    opt = torch.optim.AdamW([p for p in task.unet.parameters() if p.requires_grad], lr=cfg.train.lr)
    g = torch.Generator().manual_seed(0)

    def step():
        loss = task.training_loss(task.unet, batch, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def loop_steps_per_s(cfg, steps: int, out: Path) -> float:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, output_dir=str(out), steps=steps + 1, checkpoint_every=10**9, validate_every=0, resume=False),
        val_objects=0)
    train(cfg.train, Stage1Task(cfg.model), build_dataset(cfg.data), record_config=cfg)
    return read_json(out / "run.json")["stages"]["train"]["steps_per_s"]


def data_samples_per_s(dataset, n: int) -> float:
    it = iter(dataset) if isinstance(dataset, ShardOrbitDataset) else (dataset[i] for i in range(10**9))
    next(it)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="training loop and data benchmark")
    p.add_argument("--config", default=str(ROOT / "configs/stage1/tiny_cpu.yaml"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="outputs/benchmarks")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = {"meta": {"host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_avg": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_orbits(tmp / "orbits", objects=8, views=16, size=64)
        cfg = load_config(load_script("train_stage1").Stage1TrainConfig, args.config, [f"data.root={tmp / 'orbits'}"])
        bare = bare_steps_per_s(cfg, args.steps)
        loop = loop_steps_per_s(cfg, args.steps, tmp / "run")
        results["training_tiny_cpu"] = {
            "frames": cfg.model.num_frames, "resolution": cfg.model.resolution, "batch_size": cfg.train.batch_size,
            "ema": cfg.train.ema_decay > 0, "steps": args.steps, "bare_steps_per_s": round(bare, 3),
            "loop_steps_per_s": round(loop, 3), "loop_over_bare": round(loop / bare, 3)}
        load_script("make_shards").make_shards(tmp / "orbits", tmp / "shards", per_shard=4, seed=0)
        folders = data_samples_per_s(OrbitDataset(cfg.data), 3 * args.steps)
        shards = data_samples_per_s(ShardOrbitDataset(dataclasses.replace(cfg.data, root=str(tmp / "shards"))),
                                    3 * args.steps)
        results["data_16x64px_to_tiny"] = {"folder_samples_per_s": round(folders, 2),
                                           "shard_samples_per_s": round(shards, 2),
                                           "shards_over_folders": round(shards / folders, 3)}
    print(results)
    write_json(out / "train.json", results)
    stage1 = out / "stage1.json"
    merged = read_json(stage1) if stage1.is_file() else {}
    merged["training_tiny_cpu"] = results["training_tiny_cpu"]
    write_json(stage1, merged)
    t, d = results["training_tiny_cpu"], results["data_16x64px_to_tiny"]
    md = [f"# training benchmark\n\n{results['meta']}\n",
          f"## Tiny stage-1 training on CPU ({t['frames']} frames, {t['resolution']}², batch {t['batch_size']})\n",
          "| | steps/s | × bare step |", "|---|---|---|",
          f"| bare step (baseline) | {t['bare_steps_per_s']} | 1 |",
          f"| shared loop (accelerate, EMA, logging, final checkpoint) | {t['loop_steps_per_s']} | {t['loop_over_bare']} |",
          "\n## Data reading (16 views of 64² per object)\n", "| | samples/s | × folders |", "|---|---|---|",
          f"| orbit folders (baseline) | {d['folder_samples_per_s']} | 1 |",
          f"| tar shards | {d['shard_samples_per_s']} | {d['shards_over_folders']} |"]
    write_bytes(out / "train.md", ("\n".join(md) + "\n").encode())
    print(f"wrote {out / 'train.json'}, {out / 'train.md'} and training_tiny_cpu in {stage1}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
