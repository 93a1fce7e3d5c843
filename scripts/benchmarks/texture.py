"""Texture/decimation benchmark (run by hand): decimation of the Stanford bunny (time, faces, surface
distance, Chamfer), UV texture baking from ground-truth views (time at 512² and 1024², PSNR of the
re-rendered textured mesh against the views inside the mask), and optionally the textured mesh stage on
the demo's NeuS checkpoint (vertex colours vs baked texture: time, PSNR, Chamfer, IoU).

    .venv/bin/python scripts/benchmarks/texture.py [--out outputs/benchmarks] [--demo outputs/demo] [--threads 1]

Baselines measured in the same run: PyMCubes marching cubes at 192³ (the step decimation follows) and
rendering the same views with the pyrender orbit renderer (for the bake). Writes ``OUT/texture.json`` and
``OUT/texture.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

from hi3d.data.real_objects import REAL_OBJECTS

BUNNY, SPIDER = REAL_OBJECTS["bunny"][0], REAL_OBJECTS["spider"][0]


def clock(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def masked_psnr(pred: torch.Tensor, gt) -> float:
    """PSNR in dB over the pixels covered in both ``pred`` (re-render) and ``gt`` (orbit) views."""
    mask = (gt.rgba[..., 3:] > 0.99) & (pred.rgba[..., 3:] > 0.99)
    mse = ((pred.rgba[..., :3] - gt.rgba[..., :3]) ** 2 * mask).sum() / (3 * mask.sum())
    return float(-10 * torch.log10(mse))


def surface_distance(a: trimesh.Trimesh, b: trimesh.Trimesh, n: int = 20000) -> np.ndarray:
    from hi3d.eval.metrics import sample_surface

    return trimesh.proximity.closest_point(b, sample_surface(a, n, seed=1))[1]


def decimation(results: dict) -> trimesh.Trimesh:
    import mcubes

    from hi3d.data.mesh_io import load_world_mesh
    from hi3d.eval.metrics import chamfer_distance
    from hi3d.recon.mesh import decimate

    ax = np.linspace(-0.55, 0.55, 192)
    vol = np.linalg.norm(np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1), axis=-1) - 0.4
    _, base = clock(lambda: mcubes.marching_cubes(-vol, 0.0))
    results["baseline_marching_cubes_192_s"] = base
    world = load_world_mesh(BUNNY)
    bunny = trimesh.Trimesh(world.vertices, world.faces)
    rows = []
    for faces in (20000, 5000, 2000):
        out, t = clock(lambda: decimate(bunny, faces))
        d = np.concatenate([surface_distance(out, bunny), surface_distance(bunny, out)])
        rows.append({"target_faces": faces, "faces": len(out.faces), "time_s": t, "time_vs_marching_cubes": t / base,
                     "watertight": bool(out.is_watertight), "components": len(out.split(only_watertight=False)),
                     "surface_distance_mean": float(d.mean()), "surface_distance_max": float(d.max()),
                     "chamfer_100k": chamfer_distance(out, bunny), "volume_ratio": float(out.volume / bunny.volume)})
    results["decimation_bunny_69666_faces"] = rows
    return decimate(bunny, 20000)


def bake(results: dict, bunny20k: trimesh.Trimesh) -> None:
    from hi3d import cameras
    from hi3d.data.mesh_io import as_trimesh, load_mesh
    from hi3d.data.render import render_views
    from hi3d.recon.texture import bake_texture, uv_unwrap

    c2w, az, el = cameras.orbit_poses(16, 20.0)
    iaz, iel, ir = cameras.interpolated_views(az, el, 1.5, 16)
    c2w = torch.cat([c2w, cameras.orbit_c2w(iaz, iel, ir)])  # the 16 + 16 cameras NeuS is fitted on
    K = cameras.intrinsics(256)
    rows = []
    for name, path in (("bunny", BUNNY), ("spider", SPIDER)):
        scene, _ = load_mesh(path)
        mesh = bunny20k if name == "bunny" else as_trimesh(scene)
        geo = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
        shading = "lambert" if name == "bunny" else "flat"
        render_views(scene, c2w[:1], K, 256, 256, shading=shading)  # warm-up (EGL context)
        gt, t_render = clock(lambda: render_views(scene, c2w, K, 256, 256, shading=shading, with_depth=False))
        _, t_uv = clock(lambda: uv_unwrap(geo, 1024))
        for size in (512, 1024):
            out, t = clock(lambda: bake_texture(geo, gt, size))
            re = render_views(out, c2w, K, 256, 256, shading="flat", with_depth=False)
            rows.append({"object": name, "faces": len(geo.faces), "views": len(c2w), "view_size": 256,
                         "shading": shading, "texture_size": size, "bake_s": t, "xatlas_s": t_uv,
                         "render_views_s": t_render, "bake_vs_render": t / t_render, "psnr_in_mask_db": masked_psnr(re, gt)})
    results["bake"] = rows


def demo_stage(results: dict, demo: Path) -> None:
    from hi3d.data.mesh_io import load_world_mesh
    from hi3d.data.orbit import concat_orbits, load_orbit
    from hi3d.data.render import render_views
    from hi3d.eval.metrics import chamfer_distance, volume_iou
    from hi3d.recon.mesh import MeshConfig, extract_mesh
    from hi3d.recon.neus import load_model

    orbit = load_orbit(demo / "orbit", load_depth=False)
    views = concat_orbits(orbit, load_orbit(demo / "recon" / "interp", load_depth=False)) \
        if (demo / "recon" / "interp" / "cameras.json").is_file() else orbit
    model, step = load_model(demo / "recon" / "neus.pt")
    gt = load_world_mesh(orbit.meta.get("mesh", BUNNY), orbit.normalization)
    rows = []
    for texture, size in (("vertex", 0), ("views", 512), ("views", 1024)):
        mesh, t = clock(lambda: extract_mesh(model, MeshConfig(texture=texture, texture_size=max(size, 1)), views))
        re = render_views(mesh, orbit.c2w, orbit.K, orbit.width, orbit.height, shading="flat", with_depth=False)
        rows.append({"texture": texture, "texture_size": size or None, "mesh_stage_s": t, "faces": len(mesh.faces),
                     "psnr_in_mask_db": masked_psnr(re, orbit), "chamfer": chamfer_distance(mesh, gt),
                     "volume_iou": volume_iou(mesh, gt)})
    results["demo_mesh_stage"] = {"checkpoint_step": step, "views": len(views), "rows": rows}


def main() -> None:
    from hi3d.io import write_bytes, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/benchmarks")
    parser.add_argument("--demo", default="outputs/demo", help="demo output folder (orbit/, recon/neus.pt); skipped if absent")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"torch_threads": torch.get_num_threads()}
    bunny20k = decimation(results)
    bake(results, bunny20k)
    if (Path(args.demo) / "recon" / "neus.pt").is_file():
        demo_stage(results, Path(args.demo))

    out = Path(args.out)
    write_json(out / "texture.json", results)
    lines = ["# Texture baking and decimation benchmark", "", f"torch threads: {results['torch_threads']}, "
             f"marching cubes 192³ baseline: {results['baseline_marching_cubes_192_s']:.3f} s", ""]
    for key in ("decimation_bunny_69666_faces", "bake"):
        lines += table(results[key], key)
    if "demo_mesh_stage" in results:
        lines += table(results["demo_mesh_stage"]["rows"], f"demo mesh stage ({results['demo_mesh_stage']['views']} views)")
    write_bytes(out / "texture.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


def table(rows: list[dict], title: str) -> list[str]:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return [f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + \
        ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows] + [""]


if __name__ == "__main__":
    main()
