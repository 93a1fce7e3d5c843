"""Benchmark of the 3DGS interpolator on this machine (run by hand).

1. CPU rasteriser, forward + backward at 256² with 20k Gaussians: iterations/s of the tile rasteriser as a
   ratio to the dense evaluation (every pixel x every Gaussian; timed on a pixel strip and scaled by the
   pixel count, since its cost is linear in pixels and the full image does not fit in memory) and to
   gsplat's torch reference helpers where they run on CPU (projection; tile intersection on a subset).
2. The whole 16-view fit of a real object (``--object bunny|spider``) at 256² with ``configs/recon/gaussians.yaml``: wall
   time, Gaussians, and PSNR / SSIM against the renderer's ground truth for the training views (M = 0)
   and the M = 16 and M = 32 interpolated cameras.

    .venv/bin/python scripts/benchmarks/gaussians.py [--out outputs/benchmarks] [--skip-fit] [--object spider] [key=value ...]

Writes ``OUT/gaussians.json`` and ``OUT/gaussians.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

from hi3d import cameras  # noqa: E402
from hi3d.data.real_objects import REAL_OBJECTS  # noqa: E402
from hi3d.io import write_json  # noqa: E402
from hi3d.recon import rasterize as R  # noqa: E402


def scene(n: int, seed: int = 0):
    """``n`` Gaussians on a noisy sphere shell of radius 0.35 (an object-like depth complexity)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = d * 0.35 * (1 + 0.05 * torch.randn(n, 1, generator=g))
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.randn(n, 3, generator=g) * 0.3) * 0.008
    opac = torch.rand(n, generator=g) * 0.5 + 0.5
    colors = torch.rand(n, 3, generator=g)
    return [t.requires_grad_() for t in (means, quats, scales, opac, colors)]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def bench_rasteriser(n: int, size: int, repeats: int, strip: int) -> dict:
    params = scene(n)
    c2w, K = cameras.orbit_c2w(30.0, 20.0, 1.5), cameras.intrinsics(size, size)
    bg = torch.ones(3)

    def tiles():
        out = R.rasterize_tiles(*params, c2w, K, size, size, background=bg)
        (out.rgb.sum() + out.depth.sum()).backward()

    K_strip = K.clone()
    K_strip[1, 2] -= size // 2  # rows size/2 .. size/2 + strip of the same image

    def dense_strip():
        out = R.rasterize_dense(*params, c2w, K_strip, size, strip, background=bg)
        (out.rgb.sum() + out.depth.sum()).backward()

    t_tiles = timed(tiles, repeats)
    t_dense = timed(dense_strip, 1) * size / strip

    from gsplat.cuda._torch_impl import _fully_fused_projection, _isect_tiles, _quat_scale_to_covar_preci

    viewmat = torch.linalg.inv(c2w).float()

    def ours_projection():
        p = R.project_gaussians(params[0], params[1], params[2], params[3], viewmat, K, size, size)
        (p.means2d.sum() + p.conics.sum()).backward()

    def gsplat_projection():
        cov, _ = _quat_scale_to_covar_preci(params[1], params[2], compute_preci=False)
        _, m2, _, con, _ = _fully_fused_projection(params[0], cov, viewmat[None], K.float()[None], size, size)
        (m2.sum() + con.sum()).backward()

    sub = 500  # gsplat's torch tile intersection is a python loop per Gaussian and tile
    with torch.no_grad():
        proj = R.project_gaussians(*[p.detach()[:sub] for p in params[:4]], viewmat, K, size, size)
        cov, _ = _quat_scale_to_covar_preci(params[1].detach()[:sub], params[2].detach()[:sub], compute_preci=False)
        radii, m2, depths, _, _ = _fully_fused_projection(params[0].detach()[:sub], cov, viewmat[None],
                                                          K.float()[None], size, size)
    t_ours_isect = timed(lambda: R.bin_tiles(proj, size, size, 16), 3)
    t_gsplat_isect = timed(lambda: _isect_tiles(m2, radii, depths, 16, size // 16, size // 16), 1)
    t_ours_proj, t_gsplat_proj = timed(ours_projection, repeats), timed(gsplat_projection, repeats)
    return {
        "gaussians": n, "size": size, "threads": torch.get_num_threads(),
        "tiles_fwd_bwd_s": t_tiles, "tiles_it_per_s": 1 / t_tiles,
        "dense_fwd_bwd_s_scaled": t_dense, "dense_strip_rows": strip,
        "speedup_vs_dense": t_dense / t_tiles,
        "projection_fwd_bwd_s": {"ours": t_ours_proj, "gsplat_torch": t_gsplat_proj,
                                 "speedup": t_gsplat_proj / t_ours_proj},
        "tile_intersection_s": {"gaussians": sub, "ours": t_ours_isect, "gsplat_torch": t_gsplat_isect,
                                "speedup": t_gsplat_isect / t_ours_isect},
        "gsplat_torch_rasterize_to_pixels": "not runnable on CPU (needs the CUDA rasterize_to_indices_in_range "
                                            "kernel and nerfacc)",
    }


OBJECTS = {name: REAL_OBJECTS[name][0] for name in ("bunny", "spider")}


def bench_fit(overrides: list[str], size: int, out: Path, name: str = "bunny") -> dict:
    from hi3d.config import load_config
    from hi3d.data.orbit import load_orbit, save_orbit
    from hi3d.data.render import RenderConfig, render_orbit, render_views
    from hi3d.eval.metrics import psnr, ssim
    from hi3d.recon.gaussians import GaussianConfig, fit_gaussians
    from hi3d.recon.interpolate import interpolated_cameras, render_orbit_views

    mesh = OBJECTS[name]
    if not Path(mesh).is_file():
        return {"skipped": f"{mesh} missing (scripts/bootstrap.sh installs it)"}
    gt_dir = out / f"gaussians_gt_{name}_{size}"
    if not (gt_dir / "cameras.json").is_file():
        save_orbit(render_orbit(mesh, RenderConfig(resolution=size, num_views=16)), gt_dir)
    orbit = load_orbit(gt_dir)
    cfg = load_config(GaussianConfig, ROOT / "configs/recon/gaussians.yaml", overrides)
    t = time.perf_counter()
    model = fit_gaussians(orbit, cfg)
    result = {"object": name, "config_overrides": overrides, "fit_wall_s": time.perf_counter() - t, "gaussians": len(model),
              "views": {}}
    for m in (0, 16, 32):
        if m == 0:
            c2w, gt = orbit.c2w, orbit
        else:
            c2w = interpolated_cameras(orbit, m)[0]
            gt = render_views(mesh, c2w, orbit.K[0], size, size, with_depth=False)
        rgba, _ = render_orbit_views(model, c2w, orbit.K[0], size, size)
        pred = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        result["views"][f"M={m}"] = {"psnr": psnr(pred, gt.rgb_on_white()).mean().item(),
                                     "ssim": ssim(pred, gt.rgb_on_white()).mean().item(), "count": len(c2w)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/benchmarks")
    p.add_argument("--gaussians", type=int, default=20000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--object", default="bunny", choices=sorted(OBJECTS))
    p.add_argument("--skip-fit", action="store_true")
    p.add_argument("--skip-raster", action="store_true")
    p.add_argument("overrides", nargs="*", help="GaussianConfig overrides for the fit")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    res = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}}
    if not args.skip_raster:
        res["rasteriser"] = bench_rasteriser(args.gaussians, args.size, args.repeats, strip=2)
        print(res["rasteriser"])
    if not args.skip_fit:
        res["fit"] = bench_fit(args.overrides, args.size, out, args.object)
        print(res["fit"])
    res["machine"]["load_avg_end"] = os.getloadavg()
    write_json(out / "gaussians.json", res)
    lines = ["# 3DGS interpolator benchmark", ""]
    if "rasteriser" in res:
        r = res["rasteriser"]
        lines += [f"Rasteriser fwd+bwd, {r['gaussians']} Gaussians at {r['size']}², {r['threads']} thread(s):",
                  f"- tiles: {r['tiles_fwd_bwd_s']:.3f} s ({r['tiles_it_per_s']:.2f} it/s)",
                  f"- dense (scaled from a {r['dense_strip_rows']}-row strip): {r['dense_fwd_bwd_s_scaled']:.1f} s "
                  f"-> tiles are {r['speedup_vs_dense']:.0f}x faster",
                  f"- projection vs gsplat torch reference: {r['projection_fwd_bwd_s']['speedup']:.2f}x",
                  f"- tile intersection vs gsplat torch reference ({r['tile_intersection_s']['gaussians']} Gaussians): "
                  f"{r['tile_intersection_s']['speedup']:.0f}x",
                  f"- gsplat torch rasterize_to_pixels: {r['gsplat_torch_rasterize_to_pixels']}", ""]
    if "fit" in res and "views" in res["fit"]:
        f = res["fit"]
        lines += [f"16-view {f['object']} fit at {args.size}²: {f['fit_wall_s']:.0f} s, {f['gaussians']} Gaussians", "",
                  "| cameras | PSNR | SSIM |", "|---|---|---|"]
        lines += [f"| {k} ({v['count']} views) | {v['psnr']:.2f} | {v['ssim']:.4f} |" for k, v in f["views"].items()]
    lines += ["", f"load average start/end: {res['machine']['load_avg_start']} / {res['machine']['load_avg_end']}"]
    (out / "gaussians.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
