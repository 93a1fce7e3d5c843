"""Mesh extraction from a NeuS SDF and export.

Marching cubes (PyMCubes) on the SDF sampled over the cube ``[-bound, bound]^3`` (world units); the
grid is evaluated sparsely: a coarse grid first, then the fine grid only where the upsampled coarse SDF
is near zero. Then: keep the largest connected component(s), optional decimation (needs the
``fast-simplification`` package), vertex colours from the colour network (normal = normalised SDF
gradient, seen head-on: view direction = -normal). Export undoes the orbit's normalisation (world ->
source file coordinates, +Z up -> +Y up) and writes GLB, OBJ (+MTL when textured) and PLY atomically.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import mcubes
import numpy as np
import torch
import torch.nn.functional as F
import trimesh

from hi3d.data.mesh_io import to_file_coords
from hi3d.errors import Hi3DError
from hi3d.io import atomic_path
from hi3d.recon.neus import NeuSModel

FORMATS = ("glb", "obj", "ply")


@dataclasses.dataclass
class MeshConfig:
    resolution: int = 192  # marching-cubes grid points per axis
    bound: float = 0.55  # half-size of the extraction cube (objects fill [-0.5, 0.5]^3)
    coarse_factor: int = 4  # sparse evaluation: coarse grid every this many fine points (1 = dense)
    keep_components: int = 1  # keep this many largest connected components (0 = all)
    decimate_faces: int = 0  # target face count (0 = off; needs the fast-simplification package)
    vertex_colors: bool = True


def grid_axis(resolution: int, bound: float) -> torch.Tensor:
    return torch.linspace(-bound, bound, resolution)


def _eval_points(model: NeuSModel, pts: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    return model.query_sdf(pts.to(dev)).cpu()


def sdf_volume(model: NeuSModel, resolution: int, bound: float, coarse_factor: int = 4) -> torch.Tensor:
    """SDF ``[R, R, R]`` (float32, indexed [x, y, z]) on ``resolution`` points per axis over ``[-bound, bound]``.

    With ``coarse_factor > 1`` the SDF is evaluated on a coarse grid, trilinearly upsampled, and
    re-evaluated exactly where the upsampled value is within ~2 coarse cells of zero."""
    def dense(res: int) -> torch.Tensor:
        ax = grid_axis(res, bound)
        pts = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
        return _eval_points(model, pts).view(res, res, res)

    if coarse_factor <= 1:
        return dense(resolution)
    coarse_res = max((resolution - 1) // coarse_factor + 1, 2)
    coarse = dense(coarse_res)
    up = F.interpolate(coarse[None, None], size=(resolution,) * 3, mode="trilinear", align_corners=True)[0, 0]
    cell = 2 * bound / (coarse_res - 1)
    near = up.abs() < 2.0 * cell * 3 ** 0.5
    idx = near.nonzero()
    ax = grid_axis(resolution, bound)
    up[near] = _eval_points(model, ax[idx])
    return up


def marching_cubes(volume: torch.Tensor | np.ndarray, bound: float) -> trimesh.Trimesh:
    """Zero level set of an SDF volume ``[R, R, R]`` (negative inside) as an outward-facing mesh in world units."""
    vol = np.asarray(volume, dtype=np.float64)
    if not (vol.min() < 0 < vol.max()):
        raise Hi3DError("the SDF has no zero crossing in the extraction cube (reconstruction failed: "
                        "check that the views show the object and the cameras are right)")
    verts, faces = mcubes.marching_cubes(-vol, 0.0)  # PyMCubes wants the inside positive
    verts = verts * (2 * bound / (vol.shape[0] - 1)) - bound
    mesh = trimesh.Trimesh(verts, faces.astype(np.int64), process=True)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def keep_largest(mesh: trimesh.Trimesh, count: int = 1) -> trimesh.Trimesh:
    """The ``count`` connected components with the most faces (all when ``count`` is 0)."""
    if count <= 0:
        return mesh
    parts = mesh.split(only_watertight=False)
    if len(parts) <= count:
        return mesh
    parts = sorted(parts, key=lambda m: len(m.faces), reverse=True)[:count]
    return trimesh.util.concatenate(parts)


def decimate(mesh: trimesh.Trimesh, faces: int) -> trimesh.Trimesh:
    """Quadric decimation (fast-simplification through trimesh) to about ``faces`` triangles (0 = off).

    Pairs of coincident back-to-back triangles that the collapse can leave behind are dropped, so a
    watertight input stays watertight and in one piece."""
    if faces <= 0 or len(mesh.faces) <= faces:
        return mesh
    if importlib.util.find_spec("fast_simplification") is None:
        raise Hi3DError("mesh decimation needs the fast-simplification package: pip install fast-simplification "
                        "(or set mesh.decimate_faces=0)")
    out = mesh.simplify_quadric_decimation(face_count=faces)
    single = trimesh.grouping.group_rows(np.sort(out.faces, axis=1), require_count=1)
    if len(single) < len(out.faces):
        out.update_faces(np.sort(single))
        out.remove_unreferenced_vertices()
    return out


def vertex_colors(model: NeuSModel, mesh: trimesh.Trimesh) -> np.ndarray:
    """RGBA uint8 ``[V, 4]`` from the colour network at the vertices, seen head-on."""
    dev = next(model.parameters()).device
    v = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=dev)
    n = F.normalize(model.sdf_gradient(v), dim=-1)
    rgb = model.query_color(v, -n).cpu().numpy()
    return np.concatenate([np.round(rgb * 255), np.full((len(rgb), 1), 255)], 1).astype(np.uint8)


def extract_mesh(model: NeuSModel, cfg: MeshConfig) -> trimesh.Trimesh:
    """The model's surface in world coordinates (+Z up, unit cube), coloured if ``cfg.vertex_colors``."""
    mesh = marching_cubes(sdf_volume(model, cfg.resolution, cfg.bound, cfg.coarse_factor), cfg.bound)
    mesh = decimate(keep_largest(mesh, cfg.keep_components), cfg.decimate_faces)
    if cfg.vertex_colors:
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=vertex_colors(model, mesh))
    return mesh


def export_mesh(mesh: trimesh.Trimesh, normalization, out_dir: str | Path, name: str = "mesh") -> dict[str, Path]:
    """Write ``name.glb``, ``name.obj`` and ``name.ply`` in the source file's coordinates (atomically).

    ``normalization [4, 4]`` is the orbit's source-file -> world transform (``cameras.json``)."""
    out = Path(out_dir)
    file_mesh = to_file_coords(mesh, normalization)
    paths = {}
    for fmt in FORMATS:
        path = out / f"{name}.{fmt}"
        with atomic_path(path) as tmp:
            if fmt == "obj":
                data = trimesh.exchange.obj.export_obj(file_mesh, include_color=True, include_texture=False)
                tmp.write_text(data)
            else:
                file_mesh.export(tmp, file_type=fmt)
        paths[fmt] = path
    return paths
