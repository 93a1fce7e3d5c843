"""NeuS benchmark (run by hand): training rays/s (fwd+bwd) on this machine, hash-grid encoding speed
against its direct per-level reference (same run), marching-cubes time at 256³ (dense and sparse SDF
grid), and the demo's wall time per stage read from its run.json.

    .venv/bin/python scripts/benchmarks/neus.py [--out outputs/benchmarks] [--demo outputs/demo] [--steps 10]

Writes ``OUT/neus.json`` and ``OUT/neus.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    from hi3d import cameras
    from hi3d.data.orbit import Orbit
    from hi3d.io import write_bytes, write_json
    from hi3d.recon.hashgrid import HashGrid, reference_encode
    from hi3d.recon.mesh import marching_cubes, sdf_volume
    from hi3d.recon.neus import NeuSConfig, NeuSModel, make_optimizer, orbit_rays, training_losses

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/benchmarks")
    parser.add_argument("--demo", default="outputs/demo", help="demo output folder (for its run.json)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--config", default="configs/recon/neus.yaml")
    args = parser.parse_args()
    from hi3d.config import load_config
    from hi3d.recon.reconstruct import ReconstructConfig

    cfg: NeuSConfig = load_config(ReconstructConfig, args.config).neus
    gen = torch.Generator().manual_seed(0)
    results: dict = {"torch_threads": torch.get_num_threads(), "config": args.config,
                     "batch_rays": cfg.batch_rays, "samples_per_ray": cfg.num_samples + cfg.num_importance}

    # 1. training step: rays/s (forward + backward incl. the eikonal double backward)
    c2w, az, el = cameras.orbit_poses(4, 20.0)
    size = 64
    alpha = torch.zeros(4, size, size, 1)
    alpha[:, 16:48, 16:48] = 1
    orbit = Orbit(rgba=torch.cat([torch.full((4, size, size, 3), 0.5), alpha], -1), c2w=c2w,
                  K=cameras.intrinsics(size).expand(4, 3, 3), azimuth_deg=az, elevation_deg=el,
                  radius=torch.full((4,), 1.5, dtype=torch.float64))
    rays = orbit_rays(orbit)
    model = NeuSModel(cfg, gen)
    optim = make_optimizer(model, cfg)

    def step():
        idx = torch.randint(0, rays.origins.shape[0], (cfg.batch_rays,), generator=gen)
        batch = {"origins": rays.origins[idx], "dirs": rays.dirs[idx], "rgb": rays.rgb[idx], "alpha": rays.alpha[idx]}
        losses = training_losses(model, batch, cfg, gen)
        optim.zero_grad()
        losses["total"].backward()
        optim.step()

    t = timed(step, args.steps)
    results["train_step_s"] = t
    results["train_rays_per_s"] = cfg.batch_rays / t

    # 2. encoding fwd + bwd (incl. second order) on the ray-sample count of one step: fast vs reference
    grid = HashGrid(cfg.num_levels, cfg.features_per_level, cfg.log2_hashmap_size, cfg.base_resolution,
                    cfg.max_resolution, generator=gen)
    n = cfg.batch_rays * (cfg.num_samples + cfg.num_importance) // 4
    x = torch.rand(n, 3, generator=gen)

    def enc(fn):
        def run():
            xi = x.clone().requires_grad_(True)
            f = fn(xi)
            g, = torch.autograd.grad(f.sum(), xi, create_graph=True)
            (f.sum() + g.pow(2).sum()).backward()
        return run

    fast = timed(enc(grid), 3)
    ref = timed(enc(lambda xi: reference_encode(grid, xi)), 1)
    results["encoding_points"] = n
    results["encoding_fast_s"], results["encoding_reference_s"] = fast, ref
    results["encoding_speedup_vs_reference"] = ref / fast

    # 3. marching cubes at 256^3 on the (initial-sphere) SDF: dense grid vs sparse grid, plus PyMCubes itself
    for name, factor in (("dense", 1), ("sparse", 4)):
        start = time.perf_counter()
        vol = sdf_volume(model, 256, 0.55, coarse_factor=factor)
        results[f"sdf_grid_256_{name}_s"] = time.perf_counter() - start
    start = time.perf_counter()
    mesh = marching_cubes(vol, 0.55)
    results["marching_cubes_256_s"] = time.perf_counter() - start
    results["marching_cubes_256_faces"] = len(mesh.faces)
    results["sparse_speedup_vs_dense"] = results["sdf_grid_256_dense_s"] / results["sdf_grid_256_sparse_s"]

    # 4. the demo's stages
    demo = Path(args.demo)
    stages = {}
    for run in (demo / "run.json", demo / "recon" / "run.json"):
        if run.is_file():
            stages.update({k: v.get("wall_time_s") for k, v in json.loads(run.read_text())["stages"].items()})
    results["demo_stage_seconds"] = stages or None
    if (demo / "metrics.json").is_file():
        m = json.loads((demo / "metrics.json").read_text())
        results["demo_metrics"] = {k: m[k] for k in ("chamfer", "volume_iou", "num_interp")}

    out = Path(args.out)
    write_json(out / "neus.json", results)
    lines = ["# NeuS benchmark", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    write_bytes(out / "neus.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
