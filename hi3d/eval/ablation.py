"""Ablations of the reconstruction pipeline (paper Table 4) and of stage 2 (appendix): objects x M values.

For each object: render its ground-truth orbit; with ``views = "gt"`` reconstruct from it directly
(isolates 3DGS interpolation + NeuS), with ``views = "generated"`` first run the generation hook on the
input view (view 0) with the stage-2 switch (``full``, ``none``, ``no_depth``, ``bicubic``,
``realesrgan``); then for every M reconstruct with M interpolated views and score the mesh against the
source mesh (Chamfer, volume IoU, F-score). Output folder::

    <object>/gt/                 ground-truth orbit
    <object>/generated/          generated views (views = generated)
    <object>/M<m>/               the reconstruction's own output (mesh.*, run.json, ...)
    <object>/M<m>/metrics.json   scores; finished (object, M) pairs are skipped on re-runs
    ablation.csv / .json / .md   one row per (object, M) and the mean per M
    ablation.png                 Chamfer and IoU against M
    run.json

Hooks: a *reconstructor* ``fn(views_dir, out_dir, num_interp, overrides) -> mesh path`` (default: the
``hi3d reconstruct`` command in a child process, whose mesh is exported in the views' source-file
coordinates), and a
*generator* ``fn(input_rgba, elevation, out_dir, stage2=..., seed=..., **options) -> views dir`` for the
image->3D pipeline; both registered by name or given as ``"package.module:function"``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hi3d import cameras
from hi3d.data.mesh_io import as_trimesh, load_mesh, load_world_mesh
from hi3d.data.orbit import Orbit, load_orbit, save_orbit
from hi3d.errors import Hi3DError
from hi3d.eval import metrics
from hi3d.eval.gso import find_mesh, gso_mesh_path
from hi3d.io import read_json, write_bytes, write_json
from hi3d.recon.hull import carve

log = logging.getLogger(__name__)

STAGE2_MODES = ("full", "none", "no_depth", "bicubic", "realesrgan")
SCORES = ("chamfer", "iou", "f_score")


@dataclasses.dataclass
class AblationConfig:
    """``scripts/ablate_m.py``."""

    objects: list[str] = dataclasses.field(default_factory=list)  # mesh files, or GSO names with gso_root
    gso_root: str = ""
    m_values: list[int] = dataclasses.field(default_factory=lambda: [0, 8, 16, 32, 48])
    views: str = "gt"  # gt | generated
    out: str = "outputs/ablate_m"
    # orbit of the ground truth (and of the generated views)
    num_views: int = 16
    elevation: float = 30.0  # degrees
    resolution: int = 256
    radius: float = cameras.DEFAULT_RADIUS
    fov: float = cameras.DEFAULT_FOV_DEG
    # reconstruction
    reconstructor: str = "hi3d"  # a key of RECONSTRUCTORS or "package.module:function"
    reconstruct_overrides: list[str] = dataclasses.field(default_factory=list)  # key=value for the reconstructor
    # generation (views = generated)
    generator: str = ""  # a key of GENERATORS or "package.module:function"
    generator_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    stage2: str = "full"  # full | none | no_depth | bicubic | realesrgan
    # scoring
    num_points: int = 100_000
    iou_resolution: int = 64
    fscore_threshold: float = 0.05
    seed: int = 0


# ------------------------------------------------------------------------------------------- hooks

def reconstruct_with_hi3d(views_dir: Path, out_dir: Path, num_interp: int, overrides: list[str]) -> Path:
    """``hi3d reconstruct VIEWS --out OUT --num-interp M [key=value ...]`` in a child process (a crash of one
    run, e.g. in native code, is then one failed row; log in ``OUT/reconstruct.log``); its mesh file."""
    import subprocess
    import sys

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "hi3d.cli", "reconstruct", str(views_dir), "--out", str(out_dir),
           "--num-interp", str(num_interp), *overrides]
    with open(out_dir / "reconstruct.log", "ab") as logf:
        code = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT).returncode
    mesh = find_mesh(out_dir)
    if code != 0 or mesh is None:
        raise Hi3DError(f"hi3d reconstruct of {views_dir} (M={num_interp}) exited {code}"
                        f"{'' if mesh else ' without a mesh'}; see {out_dir / 'reconstruct.log'}")
    return mesh


def carve_visual_hull(orbit: Orbit, resolution: int = 128, bound: float = 0.55) -> torch.Tensor:
    """Silhouette carving: ``[R, R, R]`` float occupancy (indexed x, y, z) of the grid points in
    ``[-bound, bound]³`` whose projection falls inside the mask (alpha > 0.5) of every view."""
    axis = torch.linspace(-bound, bound, resolution, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    inside = carve(pts, orbit.mask, orbit.c2w, orbit.K)
    return inside.reshape(resolution, resolution, resolution).float()


def reconstruct_visual_hull(views_dir: Path, out_dir: Path, num_interp: int, overrides: list[str]) -> Path:
    """A fast stand-in reconstructor (minutes -> seconds): the visual hull of the 16 views' silhouettes plus
    M views at ``cameras.interpolated_views``, *rendered from the orbit's source mesh* (an oracle interpolator,
    so views must be GT renders). Isolates what extra views give a silhouette-based reconstruction; it is
    not the paper's 3DGS + NeuS pipeline. ``overrides``: ``resolution=<grid>``. Mesh in source coordinates."""
    import mcubes

    from hi3d.data.mesh_io import to_file_coords
    from hi3d.data.orbit import concat_orbits
    from hi3d.data.render import render_views

    opts = dict(o.split("=", 1) for o in overrides)
    orbit = load_orbit(views_dir, load_depth=False)
    if num_interp:
        source = orbit.meta.get("mesh")
        if not source:
            raise Hi3DError(f"{views_dir}: the visual-hull stand-in renders interpolated views from the source "
                            f"mesh, but cameras.json records none")
        az, el, r = cameras.interpolated_views(orbit.azimuth_deg, orbit.elevation_deg, orbit.radius, num_interp)
        extra = render_views(source, cameras.orbit_c2w(az, el, r), orbit.K[0], orbit.width, orbit.height)
        orbit = concat_orbits(orbit, extra)
    res, bound = int(opts.get("resolution", 128)), 0.55
    occ = carve_visual_hull(orbit, res, bound).numpy()
    if occ.sum() == 0:
        raise Hi3DError(f"{views_dir}: the silhouettes carve away everything")
    from scipy.ndimage import gaussian_filter

    verts, faces = mcubes.marching_cubes(gaussian_filter(occ, 1.0), 0.5)  # blurred occupancy: smooth surface
    import trimesh

    mesh = trimesh.Trimesh(verts * (2 * bound / (res - 1)) - bound, faces.astype(np.int64))
    out = Path(out_dir) / "mesh.ply"
    out.parent.mkdir(parents=True, exist_ok=True)
    from hi3d.io import atomic_path

    with atomic_path(out) as tmp:
        to_file_coords(mesh, orbit.normalization).export(tmp, file_type="ply")
    write_json(Path(out_dir) / "views.json", {"views": len(orbit), "num_interp": num_interp, "grid": res})
    return out


RECONSTRUCTORS: dict[str, Callable[..., Path]] = {"hi3d": reconstruct_with_hi3d, "visual-hull": reconstruct_visual_hull}
# the image->3D pipeline (issue 9) registers its views generator here, e.g. GENERATORS["hi3d"] = fn
GENERATORS: dict[str, Callable[..., Path]] = {}


def resolve_hook(spec: str, registry: dict[str, Callable], what: str) -> Callable:
    """A function from ``registry`` by name or from ``"package.module:function"``."""
    if spec in registry:
        return registry[spec]
    if ":" not in spec:
        known = ", ".join(sorted(registry)) or "none registered yet"
        raise Hi3DError(f"{what} '{spec}' unknown (registered: {known}); or give package.module:function")
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise Hi3DError(f"cannot load {what} '{spec}': {e}") from None


def upscale_views(orbit: Orbit, size: int, mode: str = "bicubic") -> Orbit:
    """The stage-2 baseline "plain upscaling": RGBA resized to ``size``² (intrinsics scaled to match)."""
    x = orbit.rgba.permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=mode != "nearest")
    sx, sy = size / orbit.width, size / orbit.height
    return dataclasses.replace(orbit, rgba=y.clamp(0, 1).permute(0, 2, 3, 1).contiguous(), depth=None, normal=None,
                               K=torch.stack([cameras.scale_intrinsics(k, sx, sy) for k in orbit.K]))


# ------------------------------------------------------------------------------------------- runner

def object_source(entry: str, cfg: AblationConfig) -> tuple[str, Path]:
    """``(name, mesh path)`` of an object entry: a mesh file, or a GSO name under ``cfg.gso_root``."""
    path = Path(entry)
    if path.suffix and path.is_file():
        return path.stem, path
    if cfg.gso_root:
        mesh = gso_mesh_path(cfg.gso_root, entry)
        if mesh.is_file():
            return entry, mesh
    raise Hi3DError(f"object '{entry}' is neither a mesh file nor <gso_root>/{entry}/meshes/model.obj")


def ground_truth_orbit(mesh_path: Path, cfg: AblationConfig, out_dir: Path) -> Path:
    """Render (once) the object's GT orbit into ``out_dir``; returns the folder."""
    from hi3d.data.render import RenderConfig, render_orbit

    if not (out_dir / "cameras.json").is_file():
        rc = RenderConfig(num_views=cfg.num_views, elevation=cfg.elevation, resolution=cfg.resolution,
                          radius=cfg.radius, fov=cfg.fov, seed=cfg.seed)
        save_orbit(render_orbit(mesh_path, rc), out_dir)
    return out_dir


def views_for(name: str, mesh_path: Path, cfg: AblationConfig) -> Path:
    """The views folder the reconstruction starts from (GT orbit or the generator's output)."""
    obj_dir = Path(cfg.out) / name
    gt_dir = ground_truth_orbit(mesh_path, cfg, obj_dir / "gt")
    if cfg.views == "gt":
        return gt_dir
    gen_dir = obj_dir / "generated"
    if not (gen_dir / "cameras.json").is_file():
        if not cfg.generator:
            raise Hi3DError("views=generated needs generator=<name or package.module:function> (the image->3D "
                            "pipeline's views hook)")
        generate = resolve_hook(cfg.generator, GENERATORS, "generator")
        gt = load_orbit(gt_dir, load_depth=False)
        gen_dir = Path(generate(gt.rgba[0], cfg.elevation, gen_dir, stage2=cfg.stage2, seed=cfg.seed,
                                **cfg.generator_options))
    return gen_dir


def score_reconstruction(mesh: Path, views_dir: Path, gt_mesh: Path, cfg: AblationConfig) -> dict[str, float]:
    """Scores of a reconstructed mesh exported in the views' source coordinates (``cameras.json``)."""
    norm = np.asarray(read_json(Path(views_dir) / "cameras.json").get("normalization", np.eye(4).tolist()))
    pred = load_world_mesh(mesh, normalization=norm)
    gt = as_trimesh(load_mesh(gt_mesh)[0])
    return metrics.mesh_metrics(pred, gt, "none", cfg.num_points, cfg.fscore_threshold, cfg.iou_resolution, cfg.seed)


def run_ablation(cfg: AblationConfig, reconstruct: Callable[..., Path] | None = None) -> dict[str, Any]:
    """Every (object, M): reconstruct and score; resumable, failures listed, not fatal. Writes the tables and
    the plot; returns ``{"rows", "mean_by_m", "failed"}``."""
    from hi3d.provenance import RunRecord

    if cfg.views not in ("gt", "generated"):
        raise Hi3DError(f"views '{cfg.views}' unknown (use gt or generated)")
    if cfg.stage2 not in STAGE2_MODES:
        raise Hi3DError(f"stage2 '{cfg.stage2}' unknown (use one of {STAGE2_MODES})")
    if not cfg.objects:
        raise Hi3DError("no objects given (objects=[a.obj,b.ply] or GSO names with gso_root=...)")
    if any(m < 0 for m in cfg.m_values):
        raise Hi3DError(f"m_values must be >= 0, got {cfg.m_values}")
    sources = [object_source(o, cfg) for o in cfg.objects]
    custom = reconstruct
    reconstruct = reconstruct or resolve_hook(cfg.reconstructor, RECONSTRUCTORS, "reconstructor")
    out = Path(cfg.out)
    rec = RunRecord(out, "ablate-m", config=cfg, seed=cfg.seed)
    rows, failed = [], []
    for name, mesh_path in sources:
        try:
            with rec.stage(f"{name}/views"):
                views_dir = views_for(name, mesh_path, cfg)
        except Exception as e:
            log.warning("%s: views failed: %s", name, e)
            failed.append({"object": name, "m": None, "error": f"{type(e).__name__}: {e}"})
            continue
        for m in cfg.m_values:
            run_dir = out / name / f"M{m}"
            done = run_dir / "metrics.json"
            if done.is_file():
                rows.append(read_json(done))
                continue
            try:
                with rec.stage(f"{name}/M{m}") as entry:
                    mesh = reconstruct(views_dir, run_dir, m, list(cfg.reconstruct_overrides))
                    row = {"object": name, "m": m, "views": cfg.views,
                           "stage2": cfg.stage2 if cfg.views == "generated" else None,
                           **score_reconstruction(Path(mesh), views_dir, mesh_path, cfg)}
                    entry.update({k: row[k] for k in SCORES})
                write_json(done, row)
                rows.append(row)
                log.info("%s M=%d: chamfer %.4f iou %.4f", name, m, row["chamfer"], row["iou"])
            except Exception as e:  # one failing reconstruction must not stop the table
                log.warning("%s M=%d failed: %s", name, m, e)
                write_bytes(run_dir / "error.txt", traceback.format_exc().encode())
                failed.append({"object": name, "m": m, "error": f"{type(e).__name__}: {e}"})
    result = {"views": cfg.views, "stage2": cfg.stage2 if cfg.views == "generated" else "n/a (GT views)",
              "reconstructor": getattr(custom, "__name__", "custom") if custom else cfg.reconstructor,
              "rows": rows, "mean_by_m": mean_by_m(rows), "failed": failed}
    write_outputs(out, result)
    rec.finish(failed=failed)
    return result


def mean_by_m(rows: list[dict]) -> list[dict]:
    out = []
    for m in sorted({r["m"] for r in rows}):
        sel = [r for r in rows if r["m"] == m]
        out.append({"m": m, "objects": len(sel), **{k: float(np.mean([r[k] for r in sel])) for k in SCORES}})
    return out


def write_outputs(out: Path, result: dict) -> None:
    """``ablation.json``, ``ablation.csv``, ``ablation.md`` and ``ablation.png`` (atomically)."""
    rows, means = result["rows"], result["mean_by_m"]
    write_json(out / "ablation.json", result)
    lines = ["object,m," + ",".join(SCORES)]
    lines += [f"{r['object']},{r['m']}," + ",".join(f"{r[k]:.6f}" for k in SCORES) for r in rows]
    lines += [f"mean,{r['m']}," + ",".join(f"{r[k]:.6f}" for k in SCORES) for r in means]
    lines += [f"{f['object']},{f['m']},failed,," for f in result["failed"]]
    write_bytes(out / "ablation.csv", ("\n".join(lines) + "\n").encode())
    md = [f"views: {result['views']}, stage 2: {result['stage2']}, reconstructor: {result.get('reconstructor')}", "",
          "| object | M | Chamfer ↓ | IoU ↑ | F-score ↑ |", "|---|---|---|---|---|"]
    md += [f"| {r['object']} | {r['m']} | {r['chamfer']:.4f} | {r['iou']:.4f} | {r['f_score']:.4f} |" for r in rows]
    md += [f"| **mean ({r['objects']})** | {r['m']} | {r['chamfer']:.4f} | {r['iou']:.4f} | {r['f_score']:.4f} |"
           for r in means]
    if result["failed"]:
        md += ["", "Failed: " + "; ".join(f"{f['object']} M={f['m']}: {f['error']}" for f in result["failed"])]
    write_bytes(out / "ablation.md", ("\n".join(md) + "\n").encode())
    if rows:
        plot(out / "ablation.png", rows, means)


def plot(path: Path, rows: list[dict], means: list[dict]) -> None:
    """Chamfer and IoU against M: one thin line per object, the mean in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hi3d.io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in zip(axes, ("chamfer", "iou"), ("Chamfer distance ↓", "volume IoU ↑")):
        for name in sorted({r["object"] for r in rows}):
            pts = sorted((r["m"], r[key]) for r in rows if r["object"] == name)
            ax.plot(*zip(*pts), marker="o", lw=1, alpha=0.6, label=name)
        ax.plot([r["m"] for r in means], [r[key] for r in means], marker="s", lw=2.5, color="k", label="mean")
        ax.set_xlabel("interpolated views M")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
