"""Mesh extraction from a NeuS SDF and export.

Marching cubes (PyMCubes) on the SDF sampled over the cube ``[-bound, bound]^3`` (world units); the
grid is evaluated sparsely: a coarse grid first, then the fine grid only where the upsampled coarse SDF
is near zero. Then: keep the largest connected component(s), optional decimation (quadric, through
``fast-simplification``), colours: ``texture="vertex"`` vertex colours from the colour network (normal =
normalised SDF gradient, seen head-on: view direction = -normal), ``texture="views"`` a UV atlas baked
from the views (``hi3d.recon.texture``; the colour network fills texels no view sees). Export undoes the
orbit's normalisation (world -> source file coordinates, +Z up -> +Y up) and writes GLB, OBJ (+MTL and
PNG when textured) and PLY (vertex colours) atomically.
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

from hi3d.data.mesh_io import to_file_coords, write_frame
from hi3d.data.orbit import Orbit
from hi3d.errors import Hi3DError
from hi3d.io import atomic_path
from hi3d.recon.neus import NeuSModel
from hi3d.threads import cpu_threads

FORMATS = ("glb", "obj", "ply")
TEXTURES = ("none", "vertex", "views")


@dataclasses.dataclass
class MeshConfig:
    resolution: int = 192  # marching-cubes grid points per axis
    bound: float = 0.55  # half-size of the extraction cube (objects fill [-0.5, 0.5]^3)
    coarse_factor: int = 4  # sparse evaluation: coarse grid every this many fine points (1 = dense)
    keep_components: int = 1  # keep this many largest connected components (0 = all)
    decimate_faces: int = 0  # target face count (0 = off)
    texture: str = "views"  # "none" | "vertex" (colour network at the vertices) | "views" (UV atlas baked from the views)
    texture_size: int = 1024  # texels per side of the baked atlas
    texture_max_faces: int = 20000  # texture=views: decimate to at most this many faces first (xatlas time grows fast)
    texture_dilation: int = 4  # texels the atlas is grown past chart borders
    texture_threads: int = 1  # torch CPU threads while baking (0 = auto, hi3d.threads); 1 is fastest on shared cores
    num_threads: int = 0  # torch CPU threads for the SDF grid (0 = auto: the free cores, hi3d.threads)


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


def surface_colors(model: NeuSModel, points: torch.Tensor, normals: torch.Tensor | None = None) -> torch.Tensor:
    """RGB ``[N, 3]`` (float32 in [0, 1], CPU) of the colour network at surface ``points [N, 3]`` seen head-on
    (view direction = -normal; normals default to the normalised SDF gradient)."""
    dev = next(model.parameters()).device
    p = torch.as_tensor(points, dtype=torch.float32, device=dev)
    n = model.sdf_gradient(p) if normals is None else torch.as_tensor(normals, dtype=torch.float32, device=dev)
    return model.query_color(p, -F.normalize(n, dim=-1)).cpu()


def vertex_colors(model: NeuSModel, mesh: trimesh.Trimesh) -> np.ndarray:
    """RGBA uint8 ``[V, 4]`` from the colour network at the vertices, seen head-on."""
    rgb = surface_colors(model, torch.as_tensor(mesh.vertices)).numpy()
    return np.concatenate([np.round(rgb * 255), np.full((len(rgb), 1), 255)], 1).astype(np.uint8)


def extract_mesh(model: NeuSModel, cfg: MeshConfig, views: Orbit | None = None) -> trimesh.Trimesh:
    """The model's surface in world coordinates (+Z up, unit cube), coloured as ``cfg.texture`` says;
    ``texture="views"`` bakes from ``views`` (the RGBA views NeuS was fitted on)."""
    if cfg.texture not in TEXTURES:
        raise Hi3DError(f"unknown mesh.texture '{cfg.texture}' (choose {', '.join(TEXTURES)})")
    if cfg.texture == "views" and views is None:
        raise Hi3DError("mesh.texture=views needs the views to bake from (or set mesh.texture=vertex)")
    if cfg.texture == "views" and cfg.texture_size < 8:
        raise Hi3DError(f"mesh.texture_size must be >= 8 texels (got {cfg.texture_size})")
    with cpu_threads(cfg.num_threads):
        volume = sdf_volume(model, cfg.resolution, cfg.bound, cfg.coarse_factor)
    mesh = marching_cubes(volume, cfg.bound)
    mesh = decimate(keep_largest(mesh, cfg.keep_components), cfg.decimate_faces)
    if cfg.texture == "vertex":
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=vertex_colors(model, mesh))
    elif cfg.texture == "views":
        from hi3d.recon.texture import bake_texture

        mesh = decimate(mesh, cfg.texture_max_faces)
        with cpu_threads(cfg.texture_threads):
            mesh = bake_texture(mesh, views, cfg.texture_size, fallback=lambda p, n: surface_colors(model, p, n),
                                dilation=cfg.texture_dilation)
    return mesh


def export_mesh(mesh: trimesh.Trimesh, normalization, out_dir: str | Path, name: str = "mesh") -> dict[str, Path]:
    """Write ``name.glb``, ``name.obj`` and ``name.ply`` in the source file's coordinates (atomically), and
    ``name.frame.json``: the ``normalization`` they were exported through (``mesh_io.write_frame``).

    ``normalization [4, 4]`` is the orbit's source-file -> world transform (``cameras.json``). A textured
    mesh (``bake_texture``) gives a GLB with a baseColorTexture, ``name.obj`` + ``name.mtl`` + ``name.png``
    (written before the OBJ) and a PLY with the texture sampled at the (re-welded) vertices."""
    from hi3d.io import write_bytes

    out = Path(out_dir)
    file_mesh = to_file_coords(mesh, normalization)
    textured = file_mesh.visual.kind == "texture"
    if textured:
        file_mesh.visual.material.name = name  # the OBJ's material and texture file names
    paths = {}
    for fmt in FORMATS:
        path = out / f"{name}.{fmt}"
        if fmt == "obj":
            text, extra = trimesh.exchange.obj.export_obj(
                file_mesh, include_color=not textured, include_texture=textured, mtl_name=f"{name}.mtl",
                return_texture=True)
            for fname, data in extra.items():
                write_bytes(out / fname, data)
                paths[Path(fname).suffix.lstrip(".")] = out / fname
            write_bytes(path, text.encode())
        else:
            with atomic_path(path) as tmp:
                if fmt == "ply" and textured:
                    from hi3d.recon.texture import vertex_colored

                    vertex_colored(file_mesh).export(tmp, file_type="ply")
                else:
                    file_mesh.export(tmp, file_type=fmt)
        paths[fmt] = path
    write_frame(out / f"{name}.obj", normalization)
    return paths
