"""The GSO evaluation (paper section 5): for each object of a list, render the input view and the
ground-truth orbit, run a method, score its views and its mesh, write tables.

Layout of a local Google Scanned Objects copy: ``<gso_root>/<object>/meshes/model.obj`` (with
``materials/textures/texture.png``). Two protocols (``GSOConfig.protocol``):

- ``syncdreamer`` (default): the one behind the published Tables 1-2, exactly as SyncDreamer's
  ``eval_mesh.py`` / ``eval_nvs.py`` (``hi3d.eval.syncdreamer``): its 16 cameras (elevation 30°, 256²,
  35 mm lens on a 32 mm sensor), its GT frame (raw +Z-up GSO vertices, ``norm_coords``, per-object turn),
  Chamfer between depth-map point clouds voxel-downsampled at 0.01, volume IoU by ``mesh2sdf`` at 64³,
  torchmetrics SSIM. Camera and sampling keys are fixed (set ``protocol=uniform`` to change them).
- ``uniform``: hi3d's own metrics (``hi3d.eval.metrics``): ``num_views`` cameras at ``elevation``, GT read
  by ``mesh_io.load_mesh`` (file axes -> +Z up, unit cube), Chamfer/F-score from ``num_points`` samples
  on the whole surfaces, volume IoU by ray-parity voting on an ``iou_resolution``³ grid over both meshes.
The input view is the camera of view 0 (Hi3D's frame 0 is the input).

Frames of predicted meshes (``mesh_frame``): a mesh hi3d exports has ``mesh.frame.json`` beside it
(``mesh_io.write_frame``: the 4x4 ``file_to_world`` it was exported through and its up axis), and the
evaluator always uses that record when present: generated meshes are in the generator's world (camera 0 =
the input view), reconstructions of a GT orbit in the GT file's frame. For other methods' folders without
records, say where their files are: ``world`` (hi3d's +Z-up world, camera 0 on -Y), ``syncdreamer``
(SyncDreamer's render frame, +Z up with camera 0 on +X, where SyncDreamer and methods evaluated with its
scripts write meshes), ``gt`` (the GT file's coordinates: the protocol's GT transform is applied),
``axis`` (file axes, world scale) or ``normalize`` (file axes, own unit-cube normalisation). Or write a
``mesh.frame.json`` beside each mesh. The default ``recorded`` requires the record.

Output folder ``<out>``::

    <object>/gt/            ground-truth orbit (orbit layout), rendered once and reused
    <object>/input.png      the input view given to the method (RGBA)
    <object>/pred/          whatever the method writes
    <object>/metrics.json   scores, settings key and process; marks the object finished (a resume with the
                            same settings skips it)
    <object>/error.txt      the traceback of a failed object, failed.json its one-line record (retried next run)
    results.csv / results.json / results.md   per-object rows and the mean over scored objects
    run.json                (run-shard<r>-of-<n>.json per process under accelerate launch)
    shards/                 what each process ran, skipped and failed

Objects are dealt across the processes of ``accelerate launch`` (``hi3d.parallel``: one GPU each, gloo CPU
processes without CUDA); the main process merges the per-object records into the tables once all are done.

A method is anything with ``predict(input_rgba, elevation, out_dir, object_name) -> (Orbit | None,
mesh path | None)`` (see ``Method``). ``FolderMethod`` reads precomputed predictions; other methods are
plugged in by name (``METHODS``) or as ``"package.module:factory"`` (called with ``method_options``).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import logging
import math
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from hi3d import cameras
from hi3d.data.mesh_io import (
    as_trimesh,
    axis_change,
    frame_path,
    load_mesh,
    load_scene,
    read_frame,
    unit_cube_transform,
)
from hi3d.data.orbit import Orbit, load_orbit, save_orbit
from hi3d.errors import Hi3DError
from hi3d.eval import metrics, syncdreamer
from hi3d.io import read_json, save_png, write_bytes, write_json
from hi3d.parallel import child_env

log = logging.getLogger(__name__)

MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")
MESH_FRAMES = ("recorded", "world", "syncdreamer", "gt", "axis", "normalize")
PROTOCOLS = ("syncdreamer", "uniform")
VIEW_KEYS = ("psnr", "ssim", "lpips")
MESH_KEYS = ("chamfer", "volume_iou", "f_score", "precision", "recall")
# the paper's Tables 1 (GSO views: PSNR, SSIM, LPIPS) and 2 (GSO meshes: Chamfer, volume IoU), SyncDreamer protocol
PUBLISHED_VIEWS = {"Hi3D": (24.26, 0.864, 0.119), "EpiDiff": (20.49, 0.855, 0.128), "SyncDreamer": (20.05, 0.798, 0.146)}
PUBLISHED_MESHES = {"Hi3D": (0.0172, 0.6631), "Wonder3D": (0.0199, 0.6244), "SyncDreamer": (0.0261, 0.5421)}


@dataclasses.dataclass
class GSOConfig:
    """``scripts/eval_gso.py`` / ``run_gso``."""

    gso_root: str = ""  # <gso_root>/<object>/meshes/model.obj
    objects: str = "configs/eval/gso30.txt"  # list file (one name a line, '#' comments) or comma-separated names
    out: str = "outputs/eval_gso"
    method: str = "folder"  # a name in METHODS or "package.module:factory"
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # kwargs of the method factory
    pred_dir: str = ""  # FolderMethod: <pred_dir>/<object>/mesh.* and <pred_dir>/<object>/views/
    protocol: str = "syncdreamer"  # syncdreamer (published tables) | uniform (see the module docstring)
    rotation_table: str = syncdreamer.ROTATION_TABLE  # syncdreamer: per-object GT turn (get_gt_rotate_angle)
    mesh_frame: str = "recorded"  # predicted meshes without a frame record: world | syncdreamer | gt | axis | normalize
    # cameras: fixed by the syncdreamer protocol (16 views, 30°, 256², r 1.5, 35 mm on 32 mm); free under uniform
    elevation: float = 30.0  # degrees, input view and all GT views
    num_views: int = 16
    resolution: int = 256  # GT views, pixels (predicted views are resized to it)
    input_resolution: int = 256  # the input view given to the method
    radius: float = cameras.DEFAULT_RADIUS
    fov: float | None = None  # vertical, degrees; None: the protocol's (syncdreamer 49.13°, uniform 49.1°)
    shading: str = "lambert"  # renderer shading of GT views (hi3d.data.render)
    score_input_view: bool = True  # include view 0 (the input camera) in the view metrics
    # uniform protocol only (syncdreamer: prediction as is, depth clouds, mesh2sdf at 64³)
    align: str = "none"  # none | icp
    num_points: int = 100_000  # surface samples for Chamfer / F-score
    iou_resolution: int = 64
    fscore_threshold: float = 0.05  # world units (object fits the unit cube)
    lpips_net: str = "vgg"  # vgg | alex | none
    lpips_weights: str = ""  # torchvision backbone file; default: torch hub cache; missing -> LPIPS skipped
    seed: int = 0  # uniform: surface sampling and ICP


# keys the syncdreamer protocol fixes (its cameras) or has no use for (uniform sampling): must stay at default
SYNCDREAMER_FIXED = {"elevation": syncdreamer.ELEVATION_DEG, "num_views": syncdreamer.NUM_VIEWS,
                     "resolution": syncdreamer.RESOLUTION, "radius": syncdreamer.RADIUS, "fov": None}
UNIFORM_ONLY = ("align", "num_points", "iou_resolution", "fscore_threshold", "seed")


def check_config(cfg: GSOConfig) -> None:
    """Clear errors for unknown choices and for keys the chosen protocol does not use."""
    if cfg.protocol not in PROTOCOLS:
        raise Hi3DError(f"protocol '{cfg.protocol}' unknown (use one of {PROTOCOLS})")
    if cfg.align not in metrics.ALIGN_MODES:
        raise Hi3DError(f"align '{cfg.align}' unknown (use one of {metrics.ALIGN_MODES})")
    if cfg.mesh_frame not in MESH_FRAMES:
        raise Hi3DError(f"mesh_frame '{cfg.mesh_frame}' unknown (use one of {MESH_FRAMES})")
    if cfg.protocol == "syncdreamer":
        default = GSOConfig()
        for key, value in SYNCDREAMER_FIXED.items():
            if getattr(cfg, key) != value:
                raise Hi3DError(f"protocol syncdreamer fixes {key} = {value} (got {getattr(cfg, key)}); "
                                f"set protocol=uniform to change the cameras")
        for key in UNIFORM_ONLY:
            if getattr(cfg, key) != getattr(default, key):
                raise Hi3DError(f"{key} applies to protocol=uniform only (the syncdreamer protocol has no such "
                                f"setting); drop it or set protocol=uniform")


# ------------------------------------------------------------------------------------------- methods

class Method(Protocol):
    """A method under evaluation."""

    name: str

    def predict(self, input_rgba: torch.Tensor, elevation: float, out_dir: Path,
                object_name: str) -> tuple[Orbit | None, Path | None]:
        """``input_rgba [H, W, 4]`` in [0, 1] at ``elevation`` degrees; write anything into ``out_dir``.
        Returns the predicted views at the protocol cameras (or None) and a mesh file (or None)."""
        ...


def find_mesh(folder: Path, stem: str = "mesh") -> Path | None:
    """``folder/<stem>.<ext>`` for the first supported extension present, else None."""
    for suffix in MESH_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


class FolderMethod:
    """Predictions precomputed by any method: ``<root>/<object>/mesh.{obj,glb,ply,...}`` and/or
    ``<root>/<object>/views/`` (orbit layout, views at the protocol cameras)."""

    name = "folder"

    def __init__(self, pred_dir: str | Path):
        self.root = Path(pred_dir)
        if not self.root.is_dir():
            raise Hi3DError(f"prediction folder not found: {self.root} (expected <pred_dir>/<object>/mesh.obj "
                            f"and/or <pred_dir>/<object>/views/cameras.json)")

    def predict(self, input_rgba, elevation, out_dir, object_name):
        folder = self.root / object_name
        if not folder.is_dir():
            raise Hi3DError(f"no predictions for '{object_name}' in {self.root}")
        views = load_orbit(folder / "views", load_depth=False) if (folder / "views" / "cameras.json").is_file() else None
        mesh = find_mesh(folder)
        if views is None and mesh is None:
            raise Hi3DError(f"{folder}: neither mesh.* nor views/cameras.json")
        return views, mesh


class GenerateMethod:
    """Our image->3D pipeline through its command: ``hi3d generate <out_dir>/input.png --out <out_dir>
    --elevation E [args...]`` (in a child process, log in ``generate.log``; or in-process through
    ``generate_cli(argv)``), then the mesh ``<out_dir>/**/mesh.*`` and the views of the first orbit folder
    among ``views_dirs`` (relative to ``out_dir``) are scored; a finished run is reused by its resume."""

    name = "hi3d"

    def __init__(self, args: list[str] | None = None, views_dirs: list[str] | None = None,
                 generate_cli: Callable[[list[str]], int | None] | None = None):
        self.args = list(args or [])
        self.views_dirs = list(["stage2", "stage1", "views"] if views_dirs is None else views_dirs)
        self.generate_cli = generate_cli

    def predict(self, input_rgba, elevation, out_dir, object_name):
        out_dir = Path(out_dir)
        save_png(out_dir / "input.png", input_rgba)
        argv = [str(out_dir / "input.png"), "--out", str(out_dir), "--elevation", f"{elevation:g}", *self.args]
        if self.generate_cli is not None:
            code = self.generate_cli(argv)
        else:  # a child process: isolates crashes and memory of one object from the benchmark
            with open(out_dir / "generate.log", "ab") as logf:
                code = subprocess.run([sys.executable, "-m", "hi3d.cli", "generate", *argv], stdout=logf,
                                      stderr=subprocess.STDOUT, env=child_env()).returncode
        if code not in (0, None):
            raise Hi3DError(f"hi3d generate failed for {object_name} (exit {code}; see {out_dir / 'generate.log'})")
        views = next((load_orbit(out_dir / d, load_depth=False) for d in self.views_dirs
                      if (out_dir / d / "cameras.json").is_file()), None)
        meshes = sorted(p for suffix in MESH_SUFFIXES for p in out_dir.rglob(f"mesh{suffix}"))
        return views, (meshes[0] if meshes else None)


# name -> factory(cfg, **method_options)
METHODS: dict[str, Callable[..., Method]] = {
    "folder": lambda cfg, **kw: FolderMethod(kw.get("pred_dir", cfg.pred_dir)),
    "hi3d": lambda cfg, **kw: GenerateMethod(**kw),
}


def make_method(cfg: GSOConfig) -> Method:
    """The method named by ``cfg.method``: a key of ``METHODS`` or ``"package.module:factory"``."""
    if cfg.method in METHODS:
        return METHODS[cfg.method](cfg, **cfg.method_options)
    if ":" not in cfg.method:
        raise Hi3DError(f"method '{cfg.method}' unknown: use one of {sorted(METHODS)} or 'package.module:factory'")
    module, _, attr = cfg.method.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise Hi3DError(f"cannot load method '{cfg.method}': {e}") from None
    return factory(cfg, **cfg.method_options)


# ------------------------------------------------------------------------------------------- objects

def read_object_list(spec: str) -> list[str]:
    """Names from a list file (one a line, ``#`` comments) or a comma-separated string."""
    path = Path(spec)
    if path.suffix == ".txt" or path.is_file():
        if not path.is_file():
            raise Hi3DError(f"object list not found: {path}")
        names = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    else:
        names = [n.strip() for n in spec.split(",")]
    names = [n for n in names if n]
    if not names:
        raise Hi3DError(f"object list '{spec}' is empty")
    return names


def gso_mesh_path(gso_root: str | Path, name: str) -> Path:
    return Path(gso_root) / name / "meshes" / "model.obj"


def protocol_cameras(cfg: GSOConfig, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c2w [num_views, 4, 4], K [3, 3])`` of the protocol orbit at ``resolution``²."""
    if cfg.protocol == "syncdreamer":
        c2w, K = syncdreamer.protocol_cameras()
        return c2w, cameras.scale_intrinsics(K, resolution / syncdreamer.RESOLUTION)
    c2w, _, _ = cameras.orbit_poses(cfg.num_views, cfg.elevation, cfg.radius, 0.0)
    return c2w, cameras.intrinsics(resolution, resolution, cameras.DEFAULT_FOV_DEG if cfg.fov is None else cfg.fov)


def load_ground_truth(mesh_path: str | Path, cfg: GSOConfig, name: str | None = None):
    """``(scene in hi3d's world, file -> world 4x4)`` of a GT mesh under ``cfg.protocol``: syncdreamer's
    ``transform_gt`` with the object's turn (``name``, default the folder above ``meshes/``), or
    ``mesh_io.load_mesh`` under uniform."""
    if cfg.protocol != "syncdreamer":
        return load_mesh(mesh_path)
    name = name or gso_object_name(mesh_path)
    scene = load_scene(mesh_path)
    T = syncdreamer.gt_transform(as_trimesh(scene).vertices, syncdreamer.rotation_table(cfg.rotation_table).get(name, 0.0))
    scene.apply_transform(T)
    return scene, T


def gso_object_name(mesh_path: str | Path) -> str:
    """``<root>/<name>/meshes/model.obj`` -> ``name``; any other file: its stem."""
    p = Path(mesh_path)
    return p.parent.parent.name if p.parent.name == "meshes" else p.stem


def render_ground_truth(mesh_path: Path, cfg: GSOConfig, obj_dir: Path, name: str | None = None) -> tuple[Orbit, torch.Tensor]:
    """GT orbit (cached in ``obj_dir/gt``) and the input view ``[H, W, 4]`` (``obj_dir/input.png``), rendered
    from the GT in the protocol's frame (``load_ground_truth``); a cache made otherwise is redone."""
    from hi3d.data.render import render_views
    from hi3d.io import load_png

    gt_dir, input_png = obj_dir / "gt", obj_dir / "input.png"
    scene, norm = load_ground_truth(mesh_path, cfg, name)
    c2w, K = protocol_cameras(cfg, cfg.resolution)
    if (gt_dir / "cameras.json").is_file() and input_png.is_file():
        gt = load_orbit(gt_dir, load_depth=False)
        if len(gt) == len(c2w) and gt.height == cfg.resolution and torch.allclose(gt.c2w, c2w, atol=1e-6) and \
                torch.allclose(gt.K[0], K, atol=1e-6) and np.allclose(gt.normalization.numpy(), norm, atol=1e-9):
            return gt, load_png(input_png)
    gt = render_views(scene, c2w, K, cfg.resolution, cfg.resolution, normalization=norm, shading=cfg.shading)
    n = len(c2w)
    gt.elevation_deg = torch.full((n,), float(cfg.elevation), dtype=torch.float64)
    gt.azimuth_deg = cameras.orbit_azimuths(n).to(torch.float64)
    gt.meta = {"mesh": str(mesh_path), "protocol": cfg.protocol}
    if cfg.input_resolution == cfg.resolution:
        inp = gt.rgba[0]
    else:
        K_in = protocol_cameras(cfg, cfg.input_resolution)[1]
        inp = render_views(scene, c2w[:1], K_in, cfg.input_resolution, cfg.input_resolution,
                           normalization=norm, shading=cfg.shading).rgba[0]
    save_png(input_png, inp)
    save_orbit(gt, gt_dir)
    # score against the saved 8-bit views, so a resumed run sees exactly what a fresh run scored
    return load_orbit(gt_dir, load_depth=False), load_png(input_png)


def load_pred_mesh(path: str | Path, frame: str, gt_normalization: np.ndarray | None = None):
    """A predicted mesh file as one world-space Trimesh.

    A frame record beside the file (``mesh.frame.json``, ``mesh_io.write_frame``) is always used. Without one,
    ``frame`` says where the coordinates are: ``recorded`` — nowhere known: an error; ``world`` — hi3d's
    +Z-up world; ``syncdreamer`` — SyncDreamer's render frame (+Z up, camera 0 on +X); ``gt`` — the
    ground-truth file's coordinates, the GT's transform ``gt_normalization`` is applied; ``axis`` — world
    scale in the file's axis convention, only the axis change; ``normalize`` — axis change and its own
    unit-cube normalisation.
    """
    scene = load_scene(path)
    recorded = read_frame(path)
    if recorded is not None:
        scene.apply_transform(recorded)
    elif frame == "recorded":
        raise Hi3DError(f"{path}: no frame record {frame_path(path).name} beside it; write one (see "
                        f"hi3d.data.mesh_io.write_frame) or set mesh_frame to one of {MESH_FRAMES[1:]}")
    elif frame == "syncdreamer":
        scene.apply_transform(syncdreamer.SYNCDREAMER_TO_WORLD)
    elif frame == "gt":
        if gt_normalization is None:
            raise Hi3DError("mesh frame 'gt' needs the ground truth's normalization")
        scene.apply_transform(np.asarray(gt_normalization, dtype=np.float64))
    elif frame == "axis":
        scene.apply_transform(axis_change(path))
    elif frame == "normalize":
        scene.apply_transform(axis_change(path))
        scene.apply_transform(unit_cube_transform(scene.bounds))
    elif frame != "world":
        raise Hi3DError(f"mesh frame '{frame}' unknown (use one of {MESH_FRAMES})")
    return as_trimesh(scene)


def resize_views(rgb: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, H, W, 3]`` -> ``[N, size, size, 3]`` (antialiased bilinear; unchanged if already that size)."""
    if rgb.shape[1] == size and rgb.shape[2] == size:
        return rgb
    x = F.interpolate(rgb.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def score_views(pred: Orbit, gt: Orbit, cfg: GSOConfig, lpips_model=None) -> dict[str, float]:
    """PSNR/SSIM(/LPIPS) of predicted views on white against GT views on white at GT resolution, by the
    protocol's definitions (``syncdreamer.view_metrics`` or ``metrics.view_metrics``)."""
    if len(pred) != len(gt):
        raise Hi3DError(f"method returned {len(pred)} views, the protocol has {len(gt)}")
    d_az = (pred.azimuth_deg - gt.azimuth_deg + 180) % 360 - 180
    if d_az.abs().max() > 0.5 or (pred.elevation_deg - gt.elevation_deg).abs().max() > 0.5:
        raise Hi3DError(f"predicted views are not at the protocol cameras (azimuth {pred.azimuth_deg.tolist()}, "
                        f"elevation {pred.elevation_deg.tolist()}; expected elevation {cfg.elevation})")
    p, g = resize_views(pred.rgb_on_white(), gt.height), gt.rgb_on_white()
    if not cfg.score_input_view:
        p, g = p[1:], g[1:]
    return (syncdreamer.view_metrics if cfg.protocol == "syncdreamer" else metrics.view_metrics)(p, g, lpips_model)


def score_mesh(pred_path: Path, gt_path: Path, cfg: GSOConfig, name: str | None = None) -> dict[str, float]:
    """Mesh scores of a predicted mesh file against a GT file under ``cfg.protocol``: syncdreamer
    ``{chamfer, volume_iou}``, uniform also ``f_score``, ``precision``, ``recall``."""
    gt_scene, gt_norm = load_ground_truth(gt_path, cfg, name)
    gt = as_trimesh(gt_scene)
    pred = load_pred_mesh(pred_path, cfg.mesh_frame, gt_norm)
    if cfg.protocol == "syncdreamer":
        return syncdreamer.mesh_metrics(pred, gt)
    m = metrics.mesh_metrics(pred, gt, cfg.align, cfg.num_points, cfg.fscore_threshold, cfg.iou_resolution, cfg.seed)
    m["volume_iou"] = m.pop("iou")
    return {k: m[k] for k in MESH_KEYS}


def make_lpips(cfg: GSOConfig):
    """The LPIPS model of ``cfg``, or None (with a warning) when off or its backbone weights are absent."""
    if cfg.lpips_net.lower() in ("", "none", "off"):
        return None
    try:
        return metrics.LPIPS(cfg.lpips_net, cfg.lpips_weights or None)
    except Hi3DError as e:
        log.warning("LPIPS skipped: %s", e)
        return None


# ------------------------------------------------------------------------------------------- runner

def object_key(cfg: GSOConfig) -> dict[str, Any]:
    """What an object's scores are made from (every setting but the output folder and the object list): a
    finished object whose ``metrics.json`` has another key is evaluated again."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "objects")}


def evaluate_object(name: str, cfg: GSOConfig, method: Method, lpips_model=None, shard=None) -> dict[str, Any]:
    """Render, predict and score one object; writes ``<out>/<name>/metrics.json`` (with the ``process`` of
    ``shard``, a ``hi3d.parallel.Shard``, default 0). Raises on failure."""
    obj_dir = Path(cfg.out) / name
    mesh_path = gso_mesh_path(cfg.gso_root, name)
    if not mesh_path.is_file():
        raise Hi3DError(f"GSO mesh not found: {mesh_path}")
    gt, inp = render_ground_truth(mesh_path, cfg, obj_dir, name)
    views, pred_mesh = method.predict(inp, cfg.elevation, obj_dir / "pred", name)
    row: dict[str, Any] = {"object": name, "status": "ok"}
    if views is not None:
        row.update(score_views(views, gt, cfg, lpips_model))
    if pred_mesh is not None:
        row.update(score_mesh(Path(pred_mesh), mesh_path, cfg, name))
    row = {**row, "process": shard.rank if shard is not None else 0, "key": object_key(cfg)}
    write_json(obj_dir / "metrics.json", row)
    return row


def finished_row(obj_dir: Path, key: dict) -> dict | None:
    """The object's ``metrics.json`` when it was made with ``key``, else None."""
    try:
        row = read_json(obj_dir / "metrics.json")
    except (OSError, ValueError):
        return None
    return row if row.get("key") == key else None


def run_gso(cfg: GSOConfig, method: Method | None = None, shard=None) -> dict[str, Any]:
    """Evaluate every object of ``cfg.objects``, objects dealt across the processes of ``accelerate launch``
    (``hi3d.parallel.Shard``; one process without a launch). Finished objects (``metrics.json`` of the same
    settings) are skipped, a failing object is recorded (``error.txt``, ``failed.json``) and listed, not fatal.
    Once every process is done, the tables are merged from the per-object records on disk. Returns
    ``{"rows", "mean", "failed", "skipped"}`` (also in ``results.json``, ``results.csv``, ``results.md``)."""
    from hi3d.parallel import Shard
    from hi3d.provenance import RunRecord

    check_config(cfg)
    if not cfg.gso_root or not Path(cfg.gso_root).is_dir():
        raise Hi3DError(f"GSO folder not found: '{cfg.gso_root}' (set gso_root=<folder with <object>/meshes/model.obj>)")
    names = read_object_list(cfg.objects)
    out = Path(cfg.out)
    shard = shard or Shard()
    rec = RunRecord(out, "eval-gso", config=cfg, seed=cfg.seed, filename=shard.run_filename())
    method = method or make_method(cfg)
    lpips_model = make_lpips(cfg)
    key = object_key(cfg)
    ran, failed, skipped = [], [], []
    with rec.stage("evaluate") as entry:
        for name in shard.mine(names):
            obj_dir = out / name
            if finished_row(obj_dir, key) is not None:
                skipped.append(name)
                continue
            try:
                row = evaluate_object(name, cfg, method, lpips_model, shard)
                (obj_dir / "error.txt").unlink(missing_ok=True)
                (obj_dir / "failed.json").unlink(missing_ok=True)
                ran.append(name)
                log.info("[%d/%d] %s: %s", shard.rank, shard.world, name, row)
            except Exception as e:  # one bad object must not stop a 30-object run
                msg = f"{type(e).__name__}: {e}"
                log.warning("[%d/%d] %s failed: %s", shard.rank, shard.world, name, msg)
                write_bytes(obj_dir / "error.txt", traceback.format_exc().encode())
                shard.record(obj_dir / "failed.json", {"object": name, "error": msg, "key": key})
                failed.append(name)
        entry.update(objects=len(names), mine=len(shard.mine(names)), ran=len(ran), failed=len(failed),
                     skipped=len(skipped))
    shard.log(out, "eval-gso", ran=ran, skipped=skipped, failed=failed)
    rec.finish(failed=failed)
    shard.wait()  # every object of every process has its record on disk
    result = merge_results(out, names, key, skipped=[n for lg in shard.read_logs(out, "eval-gso") for n in lg["skipped"]],
                           method=getattr(method, "name", cfg.method), protocol=cfg.protocol)
    result.update(process=shard.rank, processes=shard.world)  # the merge is the same in every process
    if shard.is_main:
        write_tables(out, result)
    return result


def merge_results(out: Path, names: list[str], key: dict, skipped: list[str], method: str, protocol: str) -> dict:
    """The run's result from the per-object records in ``out`` (``metrics.json`` with ``key``, else
    ``failed.json``), in list order; rows keep the ``process`` that scored them."""
    rows, failed = [], []
    for name in names:
        row = finished_row(out / name, key)
        if row is not None:
            rows.append({k: v for k, v in row.items() if k != "key"})
            continue
        try:
            error = read_json(out / name / "failed.json")["error"]
        except (OSError, ValueError, KeyError):
            error = "not evaluated (its process stopped before it)"
        failed.append({"object": name, "error": error})
    return {"method": method, "protocol": protocol, "rows": rows, "mean": mean_row(rows), "failed": failed,
            "skipped": [n for n in names if n in set(skipped)]}


def mean_row(rows: list[dict]) -> dict[str, float]:
    """Mean of every metric over the rows that have it (``n_<metric>`` counts them)."""
    out: dict[str, float] = {}
    for key in VIEW_KEYS + MESH_KEYS:
        vals = [r[key] for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        if vals:
            out[key] = float(np.mean(vals))
    return out


def write_tables(out: Path, result: dict) -> None:
    """``results.json``, ``results.csv`` (per object + ``mean``) and ``results.md``, atomically."""
    rows, mean = result["rows"], result["mean"]
    keys = [k for k in VIEW_KEYS + MESH_KEYS if any(k in r for r in rows)]
    write_json(out / "results.json", result)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["object"] + keys)
    for r in rows + [{"object": "mean", **mean}]:
        w.writerow([r["object"]] + [f"{r[k]:.6f}" if k in r else "" for k in keys])
    for f in result["failed"]:
        w.writerow([f["object"]] + ["failed"] * len(keys))
    write_bytes(out / "results.csv", buf.getvalue().encode())
    md = markdown_table(rows, mean, keys, result["failed"])
    md += published_tables(mean, len(rows), result.get("method", ""), result.get("protocol", "syncdreamer"))
    write_bytes(out / "results.md", md.encode())


def markdown_table(rows: list[dict], mean: dict, keys: list[str], failed: list[dict] = ()) -> str:
    lines = ["| object | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows + [{"object": "**mean**", **mean}]:
        lines.append(f"| {r['object']} | " + " | ".join(f"{r[k]:.4f}" if k in r else "" for k in keys) + " |")
    if failed:
        lines += ["", "Failed: " + ", ".join(f"{f['object']} ({f['error']})" for f in failed)]
    return "\n".join(lines) + "\n"


def published_tables(mean: dict, n: int, method: str, protocol: str) -> str:
    """Our means beside the paper's Table 1 (views) and Table 2 (meshes) rows, marked as published figures."""
    ours = f"ours: {method or 'method'} ({n} objects, protocol {protocol})"
    fmt = lambda key, digits: f"{mean[key]:.{digits}f}" if key in mean else "–"  # noqa: E731
    lines = ["", "Beside the paper (published: Hi3D, arXiv 2409.07452, Tables 1-2, 30 GSO objects, SyncDreamer "
             "protocol; not measured here):", "", "| novel views | PSNR ↑ | SSIM ↑ | LPIPS ↓ |", "|---|---|---|---|",
             f"| {ours} | {fmt('psnr', 2)} | {fmt('ssim', 3)} | {fmt('lpips', 3)} |"]
    lines += [f"| {k} (published, Table 1) | {a:.2f} | {b:.3f} | {c:.3f} |" for k, (a, b, c) in PUBLISHED_VIEWS.items()]
    lines += ["", "| meshes | Chamfer ↓ | Vol. IoU ↑ |", "|---|---|---|",
              f"| {ours} | {fmt('chamfer', 4)} | {fmt('volume_iou', 4)} |"]
    lines += [f"| {k} (published, Table 2) | {a:.4f} | {b:.4f} |" for k, (a, b) in PUBLISHED_MESHES.items()]
    return "\n".join(lines) + "\n"
