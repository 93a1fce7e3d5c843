"""The GSO evaluation protocol (paper section 5, SyncDreamer's setup): for each object of a list, render the
input view and the ground-truth orbit, run a method, score its views and its mesh, write tables.

Layout of a local Google Scanned Objects copy: ``<gso_root>/<object>/meshes/model.obj`` (with
``materials/textures/texture.png``). Protocol cameras: r = 1.5, vertical FOV 49.1°, one elevation
(30° as in SyncDreamer's GSO evaluation) for all views, ``num_views`` azimuths evenly spaced from 0; the
input view is the camera of view 0 (Hi3D's frame 0 is the input).

Output folder ``<out>``::

    <object>/gt/            ground-truth orbit (orbit layout), rendered once and reused
    <object>/input.png      the input view given to the method (RGBA)
    <object>/pred/          whatever the method writes
    <object>/metrics.json   scores; its presence marks the object finished (resume skips it)
    <object>/error.txt      the traceback of a failed object (retried on the next run)
    results.csv / results.json / results.md   per-object rows and the mean over scored objects
    run.json

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
from hi3d.data.mesh_io import as_trimesh, axis_change, load_mesh, load_scene, unit_cube_transform
from hi3d.data.orbit import Orbit, load_orbit, save_orbit
from hi3d.errors import Hi3DError
from hi3d.eval import metrics
from hi3d.io import read_json, save_png, write_bytes, write_json

log = logging.getLogger(__name__)

MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")
MESH_FRAMES = ("gt", "axis", "normalize", "world")
VIEW_KEYS = ("psnr", "ssim", "lpips")
MESH_KEYS = ("chamfer", "iou", "f_score", "precision", "recall")


@dataclasses.dataclass
class GSOConfig:
    """``scripts/eval_gso.py`` / ``run_gso``."""

    gso_root: str = ""  # <gso_root>/<object>/meshes/model.obj
    objects: str = "configs/eval/gso30.txt"  # list file (one name a line, '#' comments) or comma-separated names
    out: str = "outputs/eval_gso"
    method: str = "folder"  # a name in METHODS or "package.module:factory"
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # kwargs of the method factory
    pred_dir: str = ""  # FolderMethod: <pred_dir>/<object>/mesh.* and <pred_dir>/<object>/views/
    mesh_frame: str = "gt"  # predicted mesh coordinates: gt | axis | normalize | world (see load_pred_mesh)
    elevation: float = 30.0  # degrees, input view and all GT views
    num_views: int = 16
    resolution: int = 256  # GT views, pixels (predicted views are resized to it)
    input_resolution: int = 256  # the input view given to the method
    radius: float = cameras.DEFAULT_RADIUS
    fov: float = cameras.DEFAULT_FOV_DEG
    shading: str = "lambert"  # renderer shading of GT views (hi3d.data.render)
    score_input_view: bool = True  # include view 0 (the input camera) in the view metrics
    align: str = "none"  # none | icp
    num_points: int = 100_000  # surface samples for Chamfer / F-score
    iou_resolution: int = 64
    fscore_threshold: float = 0.05  # world units (object fits the unit cube)
    lpips_net: str = "vgg"  # vgg | alex | none
    lpips_weights: str = ""  # torchvision backbone file; default: torch hub cache; missing -> LPIPS skipped
    seed: int = 0


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
        self.views_dirs = list(views_dirs or ["stage2", "stage1", "views"])
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
                                      stderr=subprocess.STDOUT).returncode
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
    """``(c2w [num_views, 4, 4], K [3, 3])`` of the protocol orbit."""
    c2w, _, _ = cameras.orbit_poses(cfg.num_views, cfg.elevation, cfg.radius, 0.0)
    return c2w, cameras.intrinsics(resolution, resolution, cfg.fov)


def render_ground_truth(mesh_path: Path, cfg: GSOConfig, obj_dir: Path) -> tuple[Orbit, torch.Tensor]:
    """GT orbit (cached in ``obj_dir/gt``) and the input view ``[H, W, 4]`` (``obj_dir/input.png``)."""
    from hi3d.data.render import render_views
    from hi3d.io import load_png

    gt_dir, input_png = obj_dir / "gt", obj_dir / "input.png"
    if (gt_dir / "cameras.json").is_file() and input_png.is_file():
        gt = load_orbit(gt_dir, load_depth=False)
        if len(gt) == cfg.num_views and gt.height == cfg.resolution and \
                abs(float(gt.elevation_deg[0]) - cfg.elevation) < 1e-6:
            return gt, load_png(input_png)
    scene, norm = load_mesh(mesh_path)
    c2w, K = protocol_cameras(cfg, cfg.resolution)
    gt = render_views(scene, c2w, K, cfg.resolution, cfg.resolution, normalization=norm, shading=cfg.shading)
    gt.elevation_deg = torch.full((cfg.num_views,), float(cfg.elevation), dtype=torch.float64)
    gt.azimuth_deg = cameras.orbit_azimuths(cfg.num_views).to(torch.float64)
    gt.meta = {"mesh": str(mesh_path)}
    if cfg.input_resolution == cfg.resolution:
        inp = gt.rgba[0]
    else:
        K_in = cameras.intrinsics(cfg.input_resolution, cfg.input_resolution, cfg.fov)
        inp = render_views(scene, c2w[:1], K_in, cfg.input_resolution, cfg.input_resolution,
                           normalization=norm, shading=cfg.shading).rgba[0]
    save_png(input_png, inp)
    save_orbit(gt, gt_dir)
    # score against the saved 8-bit views, so a resumed run sees exactly what a fresh run scored
    return load_orbit(gt_dir, load_depth=False), load_png(input_png)


def load_pred_mesh(path: str | Path, frame: str, gt_normalization: np.ndarray | None = None):
    """A predicted mesh file as one world-space Trimesh.

    ``frame``: ``gt`` — in the ground-truth file's coordinates (hi3d exports reconstructions of a GT orbit
    there), the GT's import transform is applied; ``axis`` — world scale but the file's axis convention
    (hi3d's exported generations: +Y up for OBJ/PLY/GLB), only the axis change; ``normalize`` — axis change
    and its own unit-cube normalisation (aligns scale and centre, as SyncDreamer's ``norm_coords``);
    ``world`` — already in hi3d's +Z-up world.
    """
    scene = load_scene(path)
    if frame == "gt":
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
    """PSNR/SSIM(/LPIPS) of predicted views on white against GT views on white at GT resolution."""
    if len(pred) != len(gt):
        raise Hi3DError(f"method returned {len(pred)} views, the protocol has {len(gt)}")
    d_az = (pred.azimuth_deg - gt.azimuth_deg + 180) % 360 - 180
    if d_az.abs().max() > 0.5 or (pred.elevation_deg - gt.elevation_deg).abs().max() > 0.5:
        raise Hi3DError(f"predicted views are not at the protocol cameras (azimuth {pred.azimuth_deg.tolist()}, "
                        f"elevation {pred.elevation_deg.tolist()}; expected elevation {cfg.elevation})")
    p, g = resize_views(pred.rgb_on_white(), gt.height), gt.rgb_on_white()
    if not cfg.score_input_view:
        p, g = p[1:], g[1:]
    return metrics.view_metrics(p, g, lpips_model)


def score_mesh(pred_path: Path, gt_path: Path, cfg: GSOConfig) -> dict[str, float]:
    gt_scene, gt_norm = load_mesh(gt_path)
    gt = as_trimesh(gt_scene)
    pred = load_pred_mesh(pred_path, cfg.mesh_frame, gt_norm)
    return metrics.mesh_metrics(pred, gt, cfg.align, cfg.num_points, cfg.fscore_threshold, cfg.iou_resolution,
                                cfg.seed)


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

def evaluate_object(name: str, cfg: GSOConfig, method: Method, lpips_model=None) -> dict[str, Any]:
    """Render, predict and score one object; writes ``<out>/<name>/metrics.json``. Raises on failure."""
    obj_dir = Path(cfg.out) / name
    mesh_path = gso_mesh_path(cfg.gso_root, name)
    if not mesh_path.is_file():
        raise Hi3DError(f"GSO mesh not found: {mesh_path}")
    gt, inp = render_ground_truth(mesh_path, cfg, obj_dir)
    views, pred_mesh = method.predict(inp, cfg.elevation, obj_dir / "pred", name)
    row: dict[str, Any] = {"object": name, "status": "ok"}
    if views is not None:
        row.update(score_views(views, gt, cfg, lpips_model))
    if pred_mesh is not None:
        row.update(score_mesh(Path(pred_mesh), mesh_path, cfg))
    write_json(obj_dir / "metrics.json", row)
    return row


def run_gso(cfg: GSOConfig, method: Method | None = None) -> dict[str, Any]:
    """Evaluate every object of ``cfg.objects``; finished objects (``metrics.json``) are skipped, a failing
    object is logged and listed, not fatal. Returns ``{"rows", "mean", "failed", "skipped"}`` (also in
    ``results.json``, ``results.csv``, ``results.md``)."""
    from hi3d.provenance import RunRecord

    if cfg.align not in metrics.ALIGN_MODES:
        raise Hi3DError(f"align '{cfg.align}' unknown (use one of {metrics.ALIGN_MODES})")
    if cfg.mesh_frame not in MESH_FRAMES:
        raise Hi3DError(f"mesh_frame '{cfg.mesh_frame}' unknown (use one of {MESH_FRAMES})")
    if not cfg.gso_root or not Path(cfg.gso_root).is_dir():
        raise Hi3DError(f"GSO folder not found: '{cfg.gso_root}' (set gso_root=<folder with <object>/meshes/model.obj>)")
    names = read_object_list(cfg.objects)
    out = Path(cfg.out)
    rec = RunRecord(out, "eval-gso", config=cfg, seed=cfg.seed)
    method = method or make_method(cfg)
    lpips_model = make_lpips(cfg)
    rows, failed, skipped = [], [], []
    with rec.stage("evaluate") as entry:
        for name in names:
            done = out / name / "metrics.json"
            if done.is_file():
                rows.append(read_json(done))
                skipped.append(name)
                continue
            try:
                rows.append(evaluate_object(name, cfg, method, lpips_model))
                (out / name / "error.txt").unlink(missing_ok=True)
                log.info("%s: %s", name, rows[-1])
            except Exception as e:  # one bad object must not stop a 30-object run
                msg = f"{type(e).__name__}: {e}"
                log.warning("%s failed: %s", name, msg)
                write_bytes(out / name / "error.txt", traceback.format_exc().encode())
                failed.append({"object": name, "error": msg})
        entry.update(objects=len(names), scored=len(rows), failed=len(failed), skipped=len(skipped))
    result = {"method": getattr(method, "name", cfg.method), "rows": rows, "mean": mean_row(rows),
              "failed": failed, "skipped": skipped}
    write_tables(out, result)
    rec.finish(failed=[f["object"] for f in failed])
    return result


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
    write_bytes(out / "results.md", markdown_table(rows, mean, keys, result["failed"]).encode())


def markdown_table(rows: list[dict], mean: dict, keys: list[str], failed: list[dict] = ()) -> str:
    lines = ["| object | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows + [{"object": "**mean**", **mean}]:
        lines.append(f"| {r['object']} | " + " | ".join(f"{r[k]:.4f}" if k in r else "" for k in keys) + " |")
    if failed:
        lines += ["", "Failed: " + ", ".join(f"{f['object']} ({f['error']})" for f in failed)]
    return "\n".join(lines) + "\n"
