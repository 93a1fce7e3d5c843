"""Reading meshes into the hi3d world (+Z up, unit cube at the origin) and writing them back.

Every mesh read from a file goes through ``load_mesh``: the file's axis convention is changed to +Z up
(glTF/GLB, OBJ, PLY, DAE, OFF are taken as +Y up as by custom; STL as +Z up), then the object is
scaled and translated so its bounding box is centred at the origin with its longest side 1. The
whole import is one 4x4 matrix ``normalization`` (file coordinates -> world), recorded in
``cameras.json``; ``to_file_coords`` undoes it for export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import trimesh

from hi3d.cameras import YUP_TO_ZUP
from hi3d.errors import Hi3DError

ZUP_SUFFIXES = {".stl"}
SUPPORTED = {".obj", ".glb", ".gltf", ".ply", ".stl", ".off", ".dae"}


def axis_change(path: str | Path) -> np.ndarray:
    """4x4 from the file's axis convention to +Z up."""
    return np.eye(4) if Path(path).suffix.lower() in ZUP_SUFFIXES else YUP_TO_ZUP.numpy().copy()


def unit_cube_transform(bounds: np.ndarray) -> np.ndarray:
    """4x4 mapping an axis-aligned box ``[[min xyz], [max xyz]]`` into the unit cube at the origin."""
    center = (bounds[0] + bounds[1]) / 2
    scale = 1.0 / float(np.max(bounds[1] - bounds[0]))
    T = np.eye(4)
    T[:3, :3] *= scale
    T[:3, 3] = -center * scale
    return T


class _AssetResolver(trimesh.resolvers.FilePathResolver):
    """Texture/material look-up beside the mesh that also accepts Windows paths (``map_Kd .\\tex.jpg``)."""

    def get(self, name: str):
        try:
            return super().get(name)
        except (FileNotFoundError, ValueError):
            return super().get(name.replace("\\", "/"))


def load_scene(path: str | Path) -> trimesh.Scene:
    """Read any file trimesh reads (with materials/textures) as a Scene with at least one triangle; clear errors."""
    path = Path(path)
    if not path.is_file():
        raise Hi3DError(f"mesh file not found: {path}")
    if path.stat().st_size == 0:
        raise Hi3DError(f"mesh file is empty: {path}")
    if path.suffix.lower() not in SUPPORTED:
        raise Hi3DError(f"{path}: unsupported mesh format '{path.suffix}' (supported: {', '.join(sorted(SUPPORTED))})")
    try:
        loaded = trimesh.load(path, process=False, resolver=_AssetResolver(path))
    except Exception as e:  # trimesh raises many types for corrupt files
        raise Hi3DError(f"cannot read mesh {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    scene = loaded if isinstance(loaded, trimesh.Scene) else trimesh.Scene(loaded)
    meshes = [g for g in scene.geometry.values() if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0]
    if not meshes:
        raise Hi3DError(f"{path}: has no triangle faces (a point cloud or empty mesh cannot be rendered)")
    for g in meshes:
        if not np.isfinite(g.vertices).all():
            raise Hi3DError(f"{path}: vertices contain NaN or Inf")
    for name in [n for n, g in scene.geometry.items() if not (isinstance(g, trimesh.Trimesh) and len(g.faces))]:
        scene.delete_geometry(name)
    return scene


def load_mesh(path: str | Path, normalize: bool = True) -> tuple[trimesh.Scene, np.ndarray]:
    """``(scene in world coordinates, normalization 4x4)``; with ``normalize=False`` only the axis change."""
    scene = load_scene(path)
    T = axis_change(path)
    scene.apply_transform(T)
    if normalize:
        N = unit_cube_transform(scene.bounds)
        scene.apply_transform(N)
        T = N @ T
    return scene, T


def as_trimesh(scene: trimesh.Scene | trimesh.Trimesh) -> trimesh.Trimesh:
    """One Trimesh with all geometry of ``scene`` in scene coordinates (for metrics)."""
    if isinstance(scene, trimesh.Trimesh):
        return scene
    return scene.to_geometry() if hasattr(scene, "to_geometry") else scene.dump(concatenate=True)


def load_world_mesh(path: str | Path, normalization: np.ndarray | torch.Tensor | None = None) -> trimesh.Trimesh:
    """A mesh file as one Trimesh in world coordinates: with a recorded ``normalization`` (file -> world)
    when given (e.g. a reconstruction's source), else normalised afresh by ``load_mesh``."""
    if normalization is None:
        return as_trimesh(load_mesh(path)[0])
    scene = load_scene(path)
    scene.apply_transform(np.asarray(normalization, dtype=np.float64))
    return as_trimesh(scene)


def to_file_coords(mesh: trimesh.Trimesh, normalization: np.ndarray | torch.Tensor) -> trimesh.Trimesh:
    """Undo ``normalization`` (world -> source file coordinates, incl. +Y up) on a copy of ``mesh``."""
    out = mesh.copy()
    out.apply_transform(np.linalg.inv(np.asarray(normalization, dtype=np.float64)))
    return out


FRAME_SUFFIX = ".frame.json"


def frame_path(mesh_path: str | Path) -> Path:
    """The frame record beside a mesh file: ``mesh.obj`` -> ``mesh.frame.json`` (shared by mesh.glb/.ply)."""
    p = Path(mesh_path)
    return p.with_name(p.stem + FRAME_SUFFIX)


def file_up_axis(file_to_world: np.ndarray) -> str:
    """Which file axis ends up as the world's +Z (up) under ``file_to_world``: ``+y``, ``+z``, ... (or ``other``)."""
    R = np.asarray(file_to_world, dtype=np.float64)[:3, :3]
    up = R.T @ np.array([0.0, 0, 1])  # the file direction that maps onto +Z (up to scale)
    up /= max(np.linalg.norm(up), 1e-12)
    a = int(np.argmax(np.abs(up)))
    return f"{'+' if up[a] > 0 else '-'}{'xyz'[a]}" if abs(up[a]) > 1 - 1e-6 else "other"


def write_frame(mesh_path: str | Path, file_to_world: np.ndarray | torch.Tensor, source: str = "") -> Path:
    """Record beside ``mesh_path`` the frame its coordinates are in: the 4x4 ``file_to_world`` that brings them
    into hi3d's world (the normalisation the mesh was exported through), the file's up axis, and ``source``."""
    from hi3d.cameras import CONVENTION
    from hi3d.io import write_json

    T = np.asarray(file_to_world, dtype=np.float64)
    path = frame_path(mesh_path)
    write_json(path, {"convention": CONVENTION, "file_to_world": T.tolist(), "file_up": file_up_axis(T),
                      "source": source})
    return path


def read_frame(mesh_path: str | Path) -> np.ndarray | None:
    """The recorded ``file_to_world`` 4x4 of a mesh file (``write_frame``), or None when there is no record."""
    from hi3d.cameras import CONVENTION
    from hi3d.io import read_json

    path = frame_path(mesh_path)
    if not path.is_file():
        return None
    rec = read_json(path)
    if rec.get("convention") != CONVENTION:
        raise Hi3DError(f"{path}: convention '{rec.get('convention')}' is not '{CONVENTION}'")
    T = np.asarray(rec.get("file_to_world"), dtype=np.float64)
    if T.shape != (4, 4) or not np.isfinite(T).all():
        raise Hi3DError(f"{path}: 'file_to_world' must be a finite 4x4 matrix")
    return T
