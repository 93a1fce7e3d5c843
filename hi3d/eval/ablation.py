"""Ablations of the reconstruction pipeline (paper Table 4) and of stage 2 (Table 3): objects x M x stage-2 mode x seed.

For each object: render its ground-truth orbit; with ``views = "gt"`` reconstruct from it directly
(isolates 3DGS interpolation + NeuS), with ``views = "generated"`` first make views with ``generator``:
``perturbed`` (``hi3d.eval.perturbed``: the GT orbit with controlled multi-view inconsistency, a CPU
stand-in; config section ``perturb``) or ``hi3d`` (``hi3d generate``'s stage 1 -> stage 2 from ``weights``,
with each stage-2 mode of ``stage2``, ``hi3d.pipelines.image_to_3d.STAGE2_MODES``: ``full``, ``none``,
``no_depth``, ``bicubic``, ``realesrgan``). Then for every M and
seed reconstruct with M interpolated views and score the mesh against the source mesh (Chamfer, volume
IoU, F-score), the interpolated views against ground-truth renders at their cameras (``interp_psnr``) and
the views it started from against the ground truth (``views_psnr`` / ``views_ssim``, views 1..N-1).

The unit of work is a ``Cell`` (object, M, stage-2 mode, seed): ``ablation_cells`` lists them and
``run_cell`` does one; cells depend on each other only through the views they share (made once, first).
Under ``accelerate launch`` the views, then the cells, are dealt across the processes (``hi3d.parallel``);
the main process merges the cells' records from disk into the tables.
Output folder::

    <object>/orbit/                                   ground-truth orbit
    <object>/<variant>/s<seed>/views/                 generated views (variant = <generator>-<stage2>;
                                                      generator=hi3d: generate/stage2/)
    <object>/<variant>/s<seed>/M<m>/                  the reconstruction (variant = gt for GT views)
    <object>/<variant>/s<seed>/M<m>/metrics.json      scores, settings key, process; finished cells are
                                                      skipped on re-runs (failed.json + error.txt: failed)
    ablation.csv / .json / .md                        one row per cell, mean (± spread over seeds) per
                                                      (stage 2, M), and the paper's Table 3/4 rows, marked
    ablation.png                                      Chamfer, IoU (and interpolated-view PSNR) against M
    run.json                                          (run-shard<r>-of-<n>.json per process)
    shards/                                           what each process made, ran, skipped and failed

The reconstructor hook ``fn(views_dir, out_dir, num_interp, overrides, seed) -> mesh path`` (default: the
``hi3d reconstruct`` command in a child process, whose mesh is exported in the views' source-file
coordinates) is registered by name or given as ``"package.module:function"``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
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
from hi3d.eval.perturbed import PerturbConfig
from hi3d.io import read_json, write_bytes, write_json
from hi3d.parallel import child_env, file_lock
from hi3d.pipelines.image_to_3d import STAGE2_MODES
from hi3d.recon.hull import carve

log = logging.getLogger(__name__)

SCORES = ("chamfer", "iou", "f_score")
VIEW_SCORES = ("interp_psnr", "views_psnr", "views_ssim")

# Published numbers (paper, GSO 30 objects), printed beside ours and marked as such; not measured here.
PAPER_TABLE4 = {0: (0.0186, 0.6375), 16: (0.0172, 0.6631), 32: (0.0174, 0.6598), 48: (0.0175, 0.6607)}  # Chamfer, IoU
PAPER_TABLE3 = {"full": (24.26, 0.864, 0.119), "none": (22.09, 0.842, 0.136), "no_depth": (23.12, 0.848, 0.128)}


@dataclasses.dataclass
class AblationConfig:
    """``scripts/ablate_m.py``."""

    objects: list[str] = dataclasses.field(default_factory=list)  # mesh files, or GSO names with gso_root
    gso_root: str = ""
    m_values: list[int] = dataclasses.field(default_factory=lambda: [0, 8, 16, 32, 48])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])  # generator and reconstruction seed per cell
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
    reconstruct_overrides: list[str] = dataclasses.field(default_factory=list)  # arguments for the reconstructor
    # generation (views = generated)
    generator: str = ""  # perturbed | hi3d
    stage2: list[str] = dataclasses.field(default_factory=lambda: ["full"])  # modes, each a column of cells
    perturb: PerturbConfig = dataclasses.field(default_factory=PerturbConfig)  # generator = perturbed
    weights: str = ""  # generator = hi3d: a `hi3d generate` weights folder
    generate_overrides: list[str] = dataclasses.field(default_factory=list)  # generator = hi3d: GenerateConfig key=value
    # scoring
    num_points: int = 100_000
    iou_resolution: int = 64
    fscore_threshold: float = 0.05
    score_seed: int = 0  # surface sampling of the scores (the same for every cell)


# ------------------------------------------------------------------------------------------- hooks

def reconstruct_with_hi3d(views_dir: Path, out_dir: Path, num_interp: int, overrides: list[str], seed: int = 0) -> Path:
    """``hi3d reconstruct VIEWS --out OUT --num-interp M [key=value ...] gaussians.seed=S neus.seed=S`` in a child
    process (a crash of one run, e.g. in native code, is then one failed row; log in ``OUT/reconstruct.log``);
    its mesh file."""
    import subprocess
    import sys

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "hi3d.cli", "reconstruct", str(views_dir), "--out", str(out_dir),
           "--num-interp", str(num_interp), *overrides, f"gaussians.seed={seed}", f"neus.seed={seed}"]
    with open(out_dir / "reconstruct.log", "ab") as logf:
        code = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=child_env()).returncode
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


def reconstruct_visual_hull(views_dir: Path, out_dir: Path, num_interp: int, overrides: list[str], seed: int = 0) -> Path:
    """A fast stand-in reconstructor (minutes -> seconds): the visual hull of the 16 views' silhouettes plus
    M views at ``cameras.interpolated_views``, *rendered from the orbit's source mesh* (an oracle interpolator,
    so views must be GT renders). Isolates what extra views give a silhouette-based reconstruction; it is
    not the paper's 3DGS + NeuS pipeline. ``overrides``: ``resolution=<grid>``; deterministic (``seed`` unused).
    Mesh in source coordinates."""
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


def resolve_hook(spec: str, registry: dict[str, Callable], what: str) -> Callable:
    """A function from ``registry`` by name or from ``"package.module:function"``."""
    if spec in registry:
        return registry[spec]
    if ":" not in spec:
        raise Hi3DError(f"{what} '{spec}' unknown (registered: {', '.join(sorted(registry))}); "
                        "or give package.module:function")
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise Hi3DError(f"cannot load {what} '{spec}': {e}") from None


# ---------------------------------------------------------------------------------------------- generators

class PerturbedViews:
    """``generator=perturbed``: ``hi3d.eval.perturbed`` on the GT orbit (config section ``perturb``). It has no
    stage 2 (its ``perturb.degrade`` knob plays that part), so only ``stage2=[full]`` is accepted."""

    def check(self, cfg: AblationConfig) -> None:
        from hi3d.eval.perturbed import check_config

        check_config(cfg.perturb)
        if cfg.stage2 != ["full"]:
            raise Hi3DError(f"generator=perturbed has no stage 2 (use perturb.degrade); stage2 must be [full], "
                            f"got {cfg.stage2}")

    def key(self, cfg: AblationConfig, stage2: str) -> dict:
        return {"generator": "perturbed", "perturb": dataclasses.asdict(cfg.perturb)}

    def __call__(self, cfg: AblationConfig, gt_dir: Path, out_dir: Path, stage2: str, seed: int) -> Path:
        from hi3d.eval.perturbed import generate_perturbed

        return generate_perturbed(gt_dir, out_dir, cfg.perturb, seed)


class Hi3DViews:
    """``generator=hi3d``: ``hi3d generate`` (stage 1 -> stage 2 in the cell's mode, stopping there) on the GT
    orbit's view 0 at the orbit's elevation, from ``weights`` (+ ``generate_overrides``); the views are its
    ``stage2/`` orbit, made in ``<seed dir>/generate/``."""

    def config(self, cfg: AblationConfig, stage2: str, seed: int = 0):
        from hi3d.config import load_config
        from hi3d.pipelines.image_to_3d import GenerateConfig

        return load_config(GenerateConfig, None, [*cfg.generate_overrides, f"weights={cfg.weights}", f"stage2={stage2}",
                                                  f"seed={seed}", "stages=stage2", f"elevation={cfg.elevation}",
                                                  "auto_elevation.enabled=false"])

    def check(self, cfg: AblationConfig) -> None:
        from hi3d.pipelines.image_to_3d import check_stage2

        if not cfg.weights or not Path(cfg.weights).is_dir():
            raise Hi3DError(f"generator=hi3d needs weights=DIR, a `hi3d generate` weights folder (got '{cfg.weights}')")
        for mode in cfg.stage2:
            check_stage2(self.config(cfg, mode))

    def key(self, cfg: AblationConfig, stage2: str) -> dict:
        return {"generator": "hi3d", "weights": str(Path(cfg.weights).resolve()), "stage2": stage2,
                "overrides": list(cfg.generate_overrides)}

    def __call__(self, cfg: AblationConfig, gt_dir: Path, out_dir: Path, stage2: str, seed: int) -> Path:
        from hi3d.io import save_png
        from hi3d.pipelines.generate import generate_one

        work = Path(out_dir).parent
        save_png(work / "input.png", load_orbit(gt_dir, load_depth=False).rgba[0])
        generate_one(self.config(cfg, stage2, seed), work / "generate", source=work / "input.png")
        return work / "generate" / "stage2"


GENERATORS: dict[str, Any] = {"perturbed": PerturbedViews(), "hi3d": Hi3DViews()}


def upscale_views(orbit: Orbit, size: int, mode: str = "bicubic") -> Orbit:
    """The stage-2 baseline "plain upscaling": RGBA resized to ``size``² (intrinsics scaled to match)."""
    x = orbit.rgba.permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=mode != "nearest")
    sx, sy = size / orbit.width, size / orbit.height
    return dataclasses.replace(orbit, rgba=y.clamp(0, 1).permute(0, 2, 3, 1).contiguous(), depth=None, normal=None,
                               K=torch.stack([cameras.scale_intrinsics(k, sx, sy) for k in orbit.K]))


# ------------------------------------------------------------------------------------------- cells

@dataclasses.dataclass(frozen=True)
class Cell:
    """One unit of work: reconstruct ``object``'s views (GT, or made with stage-2 mode ``stage2``) with
    ``m`` interpolated views, generator and reconstruction seeded with ``seed``."""

    object: str
    m: int
    stage2: str | None  # None: GT views
    seed: int

    def variant(self, cfg: AblationConfig) -> str:
        return "gt" if self.stage2 is None else f"{cfg.generator}-{self.stage2}"

    def seed_dir(self, cfg: AblationConfig) -> Path:
        return Path(cfg.out) / self.object / self.variant(cfg) / f"s{self.seed}"

    def run_dir(self, cfg: AblationConfig) -> Path:
        return self.seed_dir(cfg) / f"M{self.m}"


def check_config(cfg: AblationConfig) -> None:
    """Every start-up error at once, before anything runs."""
    if cfg.views not in ("gt", "generated"):
        raise Hi3DError(f"views '{cfg.views}' unknown (use gt or generated)")
    unknown = [s for s in cfg.stage2 if s not in STAGE2_MODES]
    if unknown or not cfg.stage2:
        raise Hi3DError(f"stage2 {unknown or '[]'} unknown (use some of {', '.join(STAGE2_MODES)})")
    if not cfg.objects:
        raise Hi3DError("no objects given (objects=[a.obj,b.ply] or GSO names with gso_root=...)")
    if any(m < 0 for m in cfg.m_values) or not cfg.m_values:
        raise Hi3DError(f"m_values must be a non-empty list of M >= 0, got {cfg.m_values}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise Hi3DError(f"seeds must be a non-empty list of distinct integers, got {cfg.seeds}")
    if cfg.views == "generated":
        if cfg.generator not in GENERATORS:
            raise Hi3DError(f"views=generated needs generator=<{' | '.join(sorted(GENERATORS))}>, "
                            f"got '{cfg.generator}'")
        GENERATORS[cfg.generator].check(cfg)


def ablation_cells(cfg: AblationConfig, objects: list[str]) -> list[Cell]:
    """Every cell, object-major, then stage-2 mode, seed and M."""
    modes = cfg.stage2 if cfg.views == "generated" else [None]
    return [Cell(o, m, s2, seed) for o in objects for s2 in modes for seed in cfg.seeds for m in cfg.m_values]


def object_source(entry: str, cfg: AblationConfig) -> tuple[str, Path]:
    """``(name, mesh path)`` of an object entry: a mesh file, a real object's name (``hi3d demo --object``,
    e.g. bunny), or a GSO name under ``cfg.gso_root``."""
    from hi3d.data.real_objects import REAL_OBJECTS, resolve_object

    path = Path(entry)
    if path.suffix and path.is_file():
        return path.stem, path
    if entry in REAL_OBJECTS:
        return entry, resolve_object(entry)
    if cfg.gso_root:
        mesh = gso_mesh_path(cfg.gso_root, entry)
        if mesh.is_file():
            return entry, mesh
    raise Hi3DError(f"object '{entry}' is neither a mesh file, one of {', '.join(REAL_OBJECTS)}, nor "
                    f"<gso_root>/{entry}/meshes/model.obj")


def ground_truth_orbit(mesh_path: Path, cfg: AblationConfig, out_dir: Path) -> Path:
    """Render (once) the object's GT orbit into ``out_dir``; returns the folder. Several processes may need
    it at once: the first renders it under a lock (``out_dir.parent/.orbit.lock``), the others wait for it."""
    from hi3d.data.render import RenderConfig, render_orbit

    with file_lock(out_dir.parent / ".orbit.lock"):
        if not (out_dir / "cameras.json").is_file():  # written last: a killed render is redone
            rc = RenderConfig(num_views=cfg.num_views, elevation=cfg.elevation, resolution=cfg.resolution,
                              radius=cfg.radius, fov=cfg.fov)
            save_orbit(render_orbit(mesh_path, rc), out_dir)
    return out_dir


def views_key(cell: Cell, cfg: AblationConfig) -> dict:
    return {**GENERATORS[cfg.generator].key(cfg, cell.stage2), "seed": cell.seed}


def made_views(cell: Cell, cfg: AblationConfig) -> Path | None:
    """The cell's views folder when it is made (with the current settings), else None."""
    if cell.stage2 is None:
        gt_dir = Path(cfg.out) / cell.object / "orbit"
        return gt_dir if (gt_dir / "cameras.json").is_file() else None
    key_file = cell.seed_dir(cfg) / "views.key.json"
    try:
        saved = read_json(key_file)
    except (OSError, ValueError):
        return None
    ok = saved.get("key") == views_key(cell, cfg) and (Path(saved["views"]) / "cameras.json").is_file()
    return Path(saved["views"]) if ok else None


def views_for(cell: Cell, mesh_path: Path, cfg: AblationConfig) -> Path:
    """The views folder the cell's reconstruction starts from (GT orbit, or the generator's output, made once
    and made again when the generator's settings changed)."""
    gt_dir = ground_truth_orbit(mesh_path, cfg, Path(cfg.out) / cell.object / "orbit")
    if cell.stage2 is None:
        return gt_dir
    views_dir = made_views(cell, cfg)
    if views_dir is not None:
        return views_dir
    views_dir = Path(GENERATORS[cfg.generator](cfg, gt_dir, cell.seed_dir(cfg) / "views", cell.stage2, cell.seed))
    write_json(cell.seed_dir(cfg) / "views.key.json", {"key": views_key(cell, cfg), "views": str(views_dir)})
    return views_dir


def cell_key(cell: Cell, cfg: AblationConfig) -> dict:
    """What a cell's scores were made from: a finished cell is redone when it changes."""
    views = GENERATORS[cfg.generator].key(cfg, cell.stage2) if cell.stage2 else "gt"
    return {"views": views, "orbit": [cfg.num_views, cfg.elevation, cfg.resolution, cfg.radius, cfg.fov],
            "reconstructor": cfg.reconstructor, "overrides": list(cfg.reconstruct_overrides),
            "scoring": [cfg.num_points, cfg.iou_resolution, cfg.fscore_threshold, cfg.score_seed]}


def score_reconstruction(mesh: Path, views_dir: Path, gt_mesh: Path, cfg: AblationConfig) -> dict[str, float]:
    """Scores of a reconstructed mesh exported in the views' source coordinates (``cameras.json``)."""
    norm = np.asarray(read_json(Path(views_dir) / "cameras.json").get("normalization", np.eye(4).tolist()))
    pred = load_world_mesh(mesh, normalization=norm)
    gt = as_trimesh(load_mesh(gt_mesh)[0])
    return metrics.mesh_metrics(pred, gt, "none", cfg.num_points, cfg.fscore_threshold, cfg.iou_resolution,
                                cfg.score_seed)


def score_views(views_dir: Path, run_dir: Path, gt_dir: Path) -> dict[str, float | None]:
    """``views_psnr`` / ``views_ssim``: the views (1..N-1, on white) against the GT orbit (None for GT views);
    ``interp_psnr``: the reconstruction's interpolated views (``run_dir/interp``) against the source mesh
    rendered at their cameras (None without them)."""
    from hi3d.data.render import render_views

    gt = load_orbit(gt_dir, load_depth=False)
    out: dict[str, float | None] = dict.fromkeys(VIEW_SCORES)
    views = None if Path(views_dir).resolve() == Path(gt_dir).resolve() else load_orbit(views_dir, load_depth=False)
    if views is not None and len(views) == len(gt):
        if views.rgba.shape[1:3] != gt.rgba.shape[1:3]:
            views = upscale_views(views, gt.width)
        a, b = views.rgb_on_white()[1:], gt.rgb_on_white()[1:]
        out.update(views_psnr=float(metrics.psnr(a, b).mean()), views_ssim=float(metrics.ssim(a, b).mean()))
    interp_dir = Path(run_dir) / "interp"
    if (interp_dir / "cameras.json").is_file():
        interp = load_orbit(interp_dir, load_depth=False)
        ref = render_views(gt.meta["mesh"], interp.c2w, interp.K, interp.width, interp.height,
                           shading=gt.meta.get("shading", "lambert"), ambient=gt.meta.get("ambient", 0.5),
                           with_depth=False)
        out["interp_psnr"] = float(metrics.psnr(interp.rgb_on_white(), ref.rgb_on_white()).mean())
    return out


def finished_cell(cell: Cell, cfg: AblationConfig) -> dict | None:
    """The cell's ``metrics.json`` when it was made with the current settings (``cell_key``), else None."""
    try:
        row = read_json(cell.run_dir(cfg) / "metrics.json")
    except (OSError, ValueError):
        return None
    return row if row.get("key") == cell_key(cell, cfg) else None


def run_cell(cell: Cell, views_dir: Path, mesh_path: Path, cfg: AblationConfig, reconstruct: Callable[..., Path],
             shard=None) -> dict:
    """Reconstruct and score one cell from ``views_dir`` (or read its finished scores); writes
    ``<run dir>/metrics.json`` with the ``process`` (rank of ``shard``, a ``hi3d.parallel.Shard``) that ran it."""
    row = finished_cell(cell, cfg)
    if row is not None:
        return row
    run_dir = cell.run_dir(cfg)
    mesh = reconstruct(views_dir, run_dir, cell.m, list(cfg.reconstruct_overrides), cell.seed)
    row = {"object": cell.object, "m": cell.m, "seed": cell.seed, "views": cfg.views,
           "generator": cfg.generator if cell.stage2 else None, "stage2": cell.stage2,
           **score_reconstruction(Path(mesh), views_dir, mesh_path, cfg),
           **score_views(views_dir, run_dir, Path(cfg.out) / cell.object / "orbit"), "key": cell_key(cell, cfg),
           "process": shard.rank if shard is not None else 0}
    write_json(run_dir / "metrics.json", row)
    return row


def views_units(cells: list[Cell]) -> list[Cell]:
    """One cell per views folder (object, stage 2, seed), in cell order: the units of the views phase."""
    seen: dict[tuple, Cell] = {}
    for c in cells:
        seen.setdefault((c.object, c.stage2, c.seed), c)
    return list(seen.values())


def run_ablation(cfg: AblationConfig, reconstruct: Callable[..., Path] | None = None, shard=None) -> dict[str, Any]:
    """Every cell: reconstruct and score; resumable, failures listed, not fatal.

    Work is dealt across the processes of ``accelerate launch`` (``hi3d.parallel.Shard``; one process without
    a launch) in two phases: the views (GT orbits, generated views: one unit per object, stage 2 and seed),
    then, once all are made, the cells. Every unit is recorded on disk as it finishes (``metrics.json``, or
    ``failed.json`` / ``views.failed.json`` with the error), with the process that ran it; finished units are
    skipped on re-runs, whatever their process count. The main process merges the records from disk into the
    tables and the plot (rewritten after each of its cells, and at the end once every process is done).
    Returns ``{"rows", "summary", "failed", ...}``."""
    from hi3d.parallel import Shard
    from hi3d.provenance import RunRecord

    check_config(cfg)
    sources = dict(object_source(o, cfg) for o in cfg.objects)
    custom = reconstruct
    reconstruct = reconstruct or resolve_hook(cfg.reconstructor, RECONSTRUCTORS, "reconstructor")
    shard = shard or Shard()
    out = Path(cfg.out)
    rec = RunRecord(out, "ablate-m", config=cfg, seed=cfg.seeds[0], filename=shard.run_filename())
    info = {"views": cfg.views, "generator": cfg.generator if cfg.views == "generated" else None,
            "stage2": cfg.stage2 if cfg.views == "generated" else "n/a (GT views)", "seeds": list(cfg.seeds),
            "reconstructor": getattr(custom, "__name__", "custom") if custom else cfg.reconstructor,
            "perturb": dataclasses.asdict(cfg.perturb) if cfg.generator == "perturbed" else None}
    cells = ablation_cells(cfg, list(sources))
    account: dict[str, list] = {"views_made": [], "views_failed": [], "ran": [], "skipped": [], "failed": []}
    for unit in shard.mine(views_units(cells)):  # phase 1: the views, each made once
        failed_file = unit.seed_dir(cfg) / "views.failed.json"
        if made_views(unit, cfg) is not None:
            continue
        try:
            views_for(unit, sources[unit.object], cfg)
            failed_file.unlink(missing_ok=True)
            account["views_made"].append(_views_name(unit, cfg))
        except Exception as e:  # the views of an (object, stage 2, seed) failed: its cells are listed once
            log.warning("%s %s s%d: views failed: %s", unit.object, unit.variant(cfg), unit.seed, e)
            shard.record(failed_file, {"key": views_key(unit, cfg) if unit.stage2 else "gt",
                                       "error": f"{type(e).__name__}: {e}"})
            account["views_failed"].append(_views_name(unit, cfg))
    shard.wait()
    for cell in shard.mine(cells):  # phase 2: the cells
        name = _cell_name(cell, cfg)
        views_dir = made_views(cell, cfg)
        if views_dir is None:  # its views failed (listed by the merge)
            continue
        if finished_cell(cell, cfg) is not None:
            account["skipped"].append(name)
            continue
        try:
            with rec.stage(name) as entry:
                row = run_cell(cell, views_dir, sources[cell.object], cfg, reconstruct, shard)
                entry.update({k: row[k] for k in SCORES}, process=shard.rank)
            for stale in ("failed.json", "error.txt"):
                (cell.run_dir(cfg) / stale).unlink(missing_ok=True)
            account["ran"].append(name)
            log.info("[%d/%d] %s: chamfer %.4f iou %.4f", shard.rank, shard.world, name, row["chamfer"], row["iou"])
        except Exception as e:  # one failing cell must not stop the table
            log.warning("[%d/%d] %s failed: %s", shard.rank, shard.world, name, e)
            write_bytes(cell.run_dir(cfg) / "error.txt", traceback.format_exc().encode())
            shard.record(cell.run_dir(cfg) / "failed.json", {"key": cell_key(cell, cfg), "error": f"{type(e).__name__}: {e}"})
            account["failed"].append(name)
        if shard.is_main:  # progress: what every process has finished so far
            write_outputs(out, {**info, **merge_cells(cells, cfg, final=False)})
    shard.log(out, "ablate-m", **account)
    rec.finish(failed=account["failed"] + account["views_failed"])
    shard.wait()  # every cell of every process has its record on disk
    result = {**info, **merge_cells(cells, cfg), "process": shard.rank, "processes": shard.world}
    if shard.is_main:
        write_outputs(out, result)
    return result


def _views_name(cell: Cell, cfg: AblationConfig) -> str:
    return f"{cell.object}/{cell.variant(cfg)}/s{cell.seed}"


def _cell_name(cell: Cell, cfg: AblationConfig) -> str:
    return f"{_views_name(cell, cfg)}/M{cell.m}"


def _error(path: Path, key) -> str | None:
    try:
        rec = read_json(path)
    except (OSError, ValueError):
        return None
    return rec.get("error") if rec.get("key") == key else None


def merge_cells(cells: list[Cell], cfg: AblationConfig, final: bool = True) -> dict[str, Any]:
    """``{"rows", "summary", "failed"}`` from the records on disk, in cell order: a finished cell's
    ``metrics.json``; a views failure once per (object, stage 2, seed) (``m`` None); a cell's ``failed.json``;
    with ``final``, a cell with neither is listed as not run."""
    rows, failed, listed = [], [], set()
    for cell in cells:
        row = finished_cell(cell, cfg)
        if row is not None:
            rows.append(row)
            continue
        entry = {"object": cell.object, "m": cell.m, "stage2": cell.stage2, "seed": cell.seed}
        views_error = None if made_views(cell, cfg) is not None else _error(
            cell.seed_dir(cfg) / "views.failed.json", views_key(cell, cfg) if cell.stage2 else "gt")
        if views_error is not None:
            if _views_name(cell, cfg) not in listed:
                listed.add(_views_name(cell, cfg))
                failed.append({**entry, "m": None, "error": views_error})
            continue
        error = _error(cell.run_dir(cfg) / "failed.json", cell_key(cell, cfg))
        if error is not None or final:
            failed.append({**entry, "error": error or "not run (its process stopped before it)"})
    return {"rows": rows, "summary": summarise(rows), "failed": failed}


# ------------------------------------------------------------------------------------------- tables

def _mean(values: list) -> float | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def _std(values: list) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.std(v, ddof=1)) if len(v) > 1 else None


def summarise(rows: list[dict], by_object: bool = False) -> list[dict]:
    """Mean and spread per (stage 2, M) (and per object with ``by_object``). ``<score>``: the mean over the
    group's rows; ``<score>_std``: the sample standard deviation over seeds of the per-seed mean over
    objects (None with one seed) — the seed-to-seed noise of the row, to tell an M effect from."""
    keys = sorted({(r["object"] if by_object else "", r.get("stage2") or "", r["m"]) for r in rows})
    out = []
    for obj, s2, m in keys:
        sel = [r for r in rows if (r.get("stage2") or "") == s2 and r["m"] == m and (not by_object or r["object"] == obj)]
        seeds = sorted({r.get("seed", 0) for r in sel})
        entry = {"object": obj or None, "stage2": s2 or None, "m": m, "objects": len({r["object"] for r in sel}),
                 "seeds": len(seeds)}
        for k in SCORES + VIEW_SCORES:
            entry[k] = _mean([r.get(k) for r in sel])
            entry[f"{k}_std"] = _std([_mean([r.get(k) for r in sel if r.get("seed", 0) == s]) for s in seeds])
        out.append(entry)
    return out


def _fmt(v, digits: int = 4) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _pm(entry: dict, key: str, digits: int = 4) -> str:
    s = _fmt(entry.get(key), digits)
    return f"{s} ± {_fmt(entry[key + '_std'], digits)}" if s and entry.get(key + "_std") is not None else s


def write_outputs(out: Path, result: dict) -> None:
    """``ablation.json``, ``ablation.csv``, ``ablation.md`` and ``ablation.png`` (atomically)."""
    rows, summary, failed = result["rows"], result["summary"], result["failed"]
    per_object = summarise(rows, by_object=True)
    published = {"table4": [{"m": m, "chamfer": c, "iou": i} for m, (c, i) in PAPER_TABLE4.items()],
                 "table3": [{"stage2": s, "psnr": p, "ssim": q, "lpips": lp} for s, (p, q, lp) in PAPER_TABLE3.items()],
                 "note": "published in the paper (GSO, 30 objects), not measured here"}
    write_json(out / "ablation.json", {**result, "per_object": per_object, "published": published})
    cols = ["source", "object", "stage2", "m", "seed", *SCORES, *VIEW_SCORES]
    std_cols = [f"{k}_std" for k in SCORES + VIEW_SCORES]
    lines = [",".join(cols + std_cols)]
    lines += [",".join(["ours", r["object"], r.get("stage2") or "", str(r["m"]), str(r.get("seed", 0))]
                       + [_fmt(r.get(k), 6) for k in SCORES + VIEW_SCORES]) + "," * len(std_cols) for r in rows]
    lines += [",".join(["ours-mean", "mean", s["stage2"] or "", str(s["m"]), f"n={s['seeds']}"]
                       + [_fmt(s[k], 6) for k in SCORES + VIEW_SCORES] + [_fmt(s[k], 6) for k in std_cols])
              for s in summary]
    lines += [f"published-table4,GSO,full,{m},,{c},{i}," + "," * (len(VIEW_SCORES) + len(std_cols))
              for m, (c, i) in PAPER_TABLE4.items()]
    lines += [f"failed,{f['object']},{f.get('stage2') or ''},{'' if f['m'] is None else f['m']},{f.get('seed', '')}"
              + "," * (len(cols) + len(std_cols) - 5) for f in failed]
    write_bytes(out / "ablation.csv", ("\n".join(lines) + "\n").encode())
    seeds = result.get("seeds", [0])
    md = [f"views: {result['views']}, generator: {result.get('generator')}, stage 2: {result['stage2']}, "
          f"reconstructor: {result.get('reconstructor')}, seeds: {seeds}", ""]
    if result.get("perturb"):
        md += ["perturbation: " + ", ".join(f"{k} {v}" for k, v in result["perturb"].items()), ""]
    md += ["## Ours: mean over objects" + (" ± std over seeds" if len(seeds) > 1 else ""), "",
           "| stage 2 | M | objects | seeds | Chamfer ↓ | IoU ↑ | F-score ↑ | interp. views PSNR | views PSNR | views SSIM |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {s['stage2'] or 'GT views'} | {s['m']} | {s['objects']} | {s['seeds']} | {_pm(s, 'chamfer')} | "
           f"{_pm(s, 'iou')} | {_pm(s, 'f_score')} | {_pm(s, 'interp_psnr', 2)} | {_pm(s, 'views_psnr', 2)} | "
           f"{_pm(s, 'views_ssim', 3)} |" for s in summary]
    md += ["", "## Published (paper Table 4: M, GSO meshes; not measured here)", "", "| M | Chamfer ↓ | IoU ↑ |",
           "|---|---|---|"] + [f"| {m} | {c:.4f} | {i:.4f} |" for m, (c, i) in PAPER_TABLE4.items()]
    md += ["", "## Published (paper Table 3: stage 2, GSO views; not measured here)", "",
           "| stage 2 | PSNR ↑ | SSIM ↑ | LPIPS ↓ |", "|---|---|---|---|"]
    md += [f"| {s} | {p:.2f} | {q:.3f} | {lp:.3f} |" for s, (p, q, lp) in PAPER_TABLE3.items()]
    md += ["", "## Per object" + (" (mean ± std over seeds)" if len(seeds) > 1 else ""), "",
           "| object | stage 2 | M | seeds | Chamfer ↓ | IoU ↑ | F-score ↑ | interp. views PSNR |",
           "|---|---|---|---|---|---|---|---|"]
    md += [f"| {s['object']} | {s['stage2'] or 'GT views'} | {s['m']} | {s['seeds']} | {_pm(s, 'chamfer')} | "
           f"{_pm(s, 'iou')} | {_pm(s, 'f_score')} | {_pm(s, 'interp_psnr', 2)} |" for s in per_object]
    if failed:
        md += ["", "Failed: " + "; ".join(f"{f['object']} {f.get('stage2') or ''} s{f.get('seed')} M={f['m']}: "
                                          f"{f['error']}" for f in failed)]
    write_bytes(out / "ablation.md", ("\n".join(md) + "\n").encode())
    if rows:
        plot(out / "ablation.png", per_object, summary)


def plot(path: Path, per_object: list[dict], summary: list[dict]) -> None:
    """Chamfer, IoU and interpolated-view PSNR against M: a thin line per object, the mean in bold with the
    seed spread as error bars, the paper's Table 4 dashed (published, GSO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hi3d.io import atomic_path

    panels = [("chamfer", "Chamfer distance ↓"), ("iou", "volume IoU ↑")]
    if any(s["interp_psnr"] is not None for s in summary):
        panels.append(("interp_psnr", "interpolated-view PSNR (dB) ↑"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    for ax, (key, label) in zip(axes, panels):
        for obj, s2 in sorted({(r["object"], r["stage2"] or "") for r in per_object}):
            pts = sorted((r["m"], r[key]) for r in per_object
                         if r["object"] == obj and (r["stage2"] or "") == s2 and r[key] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", lw=1, alpha=0.5, label=f"{obj} {s2}".strip())
        for s2 in sorted({s["stage2"] or "" for s in summary}):
            sel = sorted((s["m"], s[key], s[f"{key}_std"] or 0.0) for s in summary
                         if (s["stage2"] or "") == s2 and s[key] is not None)
            if sel:
                m, v, e = zip(*sel)
                ax.errorbar(m, v, yerr=e, marker="s", lw=2.5, capsize=3, label=f"mean {s2}".strip())
        if key in ("chamfer", "iou"):
            col = 0 if key == "chamfer" else 1
            ax.plot(list(PAPER_TABLE4), [v[col] for v in PAPER_TABLE4.values()], "k--", marker="x", lw=1,
                    label="paper Table 4 (GSO, published)")
        ax.set_xlabel("interpolated views M")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
