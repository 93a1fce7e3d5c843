"""SyncDreamer's GSO protocol (``eval_mesh.py``, ``eval_nvs.py`` of liuyuan-pal/SyncDreamer), which Hi3D's
Tables 1-2 follow, re-implemented on hi3d's renderer and camera convention.

Cameras: 16 views at elevation 30°, azimuth i·22.5°, radius 1.5, 256², lens 35 mm on a 32 mm sensor
(focal 280 px, vertical FOV 2·atan(16/35) = 49.13°). SyncDreamer's render frame is +Z up with camera 0 on
the +X axis; hi3d's camera 0 is on -Y, so a mesh in SyncDreamer's frame enters hi3d's world by a -90°
turn about +Z (``SYNCDREAMER_TO_WORLD``); view i is then the same camera in both.

Ground truth: the GSO file's vertices as they are (GSO meshes are +Z up: ``eval_mesh.py`` reads them raw
and turns them about Z only), normalised by ``norm_coords`` (largest bounding-box side 1, box centre at the
origin), turned by ``-angle`` about +Z with the per-object angle of ``get_gt_rotate_angle``
(``configs/eval/syncdreamer_gt_rotation.yaml``), then into hi3d's world. The prediction is used as it is,
in the render frame (no alignment).

Chamfer: each mesh's depth rendered at the 16 cameras and back-projected (SyncDreamer's
``mask_depth_to_pts`` back-projects pixel (row i, column j) at image coordinates (j, i), half a pixel off
the centre the depth was rendered at; kept, so numbers match), each cloud voxel-downsampled at 0.01 with
Open3D's ``voxel_down_sample`` semantics (``voxel_down_sample``), ``CD = (mean_p min_q |p-q| +
mean_q min_p |q-p|) / 2`` unsquared. Only what a camera sees counts: hidden inner parts and an
unseen bottom change nothing. Volume IoU: ``mesh2sdf.compute(vertices, faces, 64, fix=False)`` of each
mesh (grid nodes at -1 + 2i/64 over [-1, 1]³), occupancy ``sdf < 0``.

Views: RGBA composited on white, PSNR per image on [0, 1] floats (float32, no floor: identical images
give inf, as there), SSIM by ``torchmetrics.functional.structural_similarity_index_measure`` with its
defaults (Gaussian 11×11, σ 1.5, data range from the images), LPIPS VGG on [-1, 1]; means over the views.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree

from hi3d import cameras
from hi3d.errors import Hi3DError
from hi3d.eval import metrics

NUM_VIEWS = 16
ELEVATION_DEG = 30.0
RADIUS = 1.5
RESOLUTION = 256
LENS_MM, SENSOR_MM = 35.0, 32.0
FOV_DEG = math.degrees(2 * math.atan(SENSOR_MM / 2 / LENS_MM))  # 49.134°
VOXEL_SIZE = 0.01
IOU_SIZE = 64
ROTATION_TABLE = "configs/eval/syncdreamer_gt_rotation.yaml"

# SyncDreamer's render frame (+Z up, camera 0 on +X) -> hi3d world (+Z up, camera 0 on -Y): -90° about +Z
SYNCDREAMER_TO_WORLD = np.array([[0.0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


def protocol_cameras() -> tuple[torch.Tensor, torch.Tensor]:
    """``(c2w [16, 4, 4], K [3, 3])`` of the protocol views in hi3d's world (K: f = 280 px, c = 128)."""
    c2w, _, _ = cameras.orbit_poses(NUM_VIEWS, ELEVATION_DEG, RADIUS, 0.0)
    f = LENS_MM / SENSOR_MM * RESOLUTION
    K = torch.tensor([[f, 0, RESOLUTION / 2], [0, f, RESOLUTION / 2], [0, 0, 1]], dtype=torch.float64)
    return c2w, K


def repo_path(rel: str | Path) -> Path:
    """``rel`` as given when it exists, else relative to the repository root (for the shipped configs)."""
    p = Path(rel)
    return p if p.exists() or p.is_absolute() else Path(__file__).resolve().parents[2] / p


def rotation_table(path: str | Path = ROTATION_TABLE) -> dict[str, float]:
    """Object name -> GT turn in degrees (``get_gt_rotate_angle``; objects not listed: 0)."""
    from omegaconf import OmegaConf

    p = repo_path(path)
    if not p.is_file():
        raise Hi3DError(f"GT rotation table not found: {p}")
    return {str(k): float(v) for k, v in OmegaConf.to_container(OmegaConf.load(p)).items()}


def norm_coords_transform(vertices: np.ndarray) -> np.ndarray:
    """4x4 of ``norm_coords``: scale so the largest bounding-box side is 1, then centre the box at the origin."""
    v = np.asarray(vertices, dtype=np.float64)
    lo, hi = v.min(0), v.max(0)
    s = 1.0 / float(np.max(hi - lo))
    T = np.eye(4)
    T[:3, :3] *= s
    T[:3, 3] = -(lo + hi) / 2 * s
    return T


def gt_transform(vertices: np.ndarray, angle_deg: float) -> np.ndarray:
    """4x4 from a GSO file's coordinates to hi3d's world under the protocol (``transform_gt``, then the
    SyncDreamer -> hi3d frame turn). ``vertices [N, 3]``: all vertices of the file."""
    R = trimesh.transformations.rotation_matrix(-math.radians(angle_deg), [0, 0, 1])
    return SYNCDREAMER_TO_WORLD @ R @ norm_coords_transform(vertices)


def voxel_down_sample(points: np.ndarray, voxel_size: float = VOXEL_SIZE) -> np.ndarray:
    """Open3D's ``PointCloud.voxel_down_sample``: voxel grid anchored at the cloud's minimum minus half a voxel,
    index ``floor((p - anchor) / voxel_size)``, one point per occupied voxel = the mean of its points.
    ``[N, 3]`` -> ``[V, 3]`` float64 (voxels in lexicographic index order; Open3D's order is a hash map's)."""
    p = np.asarray(points, dtype=np.float64)
    if len(p) == 0:
        return p.reshape(0, 3)
    anchor = p.min(0) - voxel_size * 0.5
    idx = np.floor((p - anchor) / voxel_size).astype(np.int64)
    dims = idx.max(0) + 1
    key = (idx[:, 0] * dims[1] + idx[:, 1]) * dims[2] + idx[:, 2]  # lexicographic voxel key
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    out = np.stack([np.bincount(inverse, weights=p[:, a], minlength=len(counts)) for a in range(3)], 1)
    return out / counts[:, None]


def depth_points(mesh: trimesh.Trimesh | trimesh.Scene, c2w: torch.Tensor | None = None,
                 K: torch.Tensor | None = None) -> np.ndarray:
    """Points ``[P, 3]`` (float32, world) seen from the protocol cameras: depth of ``mesh`` (world coordinates)
    rendered at each camera, pixels the surface covers back-projected at (column, row) as SyncDreamer does."""
    from hi3d.data.render import render_depth

    if c2w is None or K is None:
        c2w, K = protocol_cameras()
    depth = render_depth(mesh, c2w, K, RESOLUTION, RESOLUTION)
    v, u = torch.meshgrid(torch.arange(RESOLUTION, dtype=torch.float64), torch.arange(RESOLUTION, dtype=torch.float64),
                          indexing="ij")
    uv = torch.stack([u, v], -1)
    pts = [cameras.unproject(uv[d > 0], d[d > 0].double(), c2w[i], K) for i, d in enumerate(depth)]
    return torch.cat(pts).numpy().astype(np.float32)


def surface_cloud(mesh) -> np.ndarray:
    """The protocol's point cloud of a mesh: ``depth_points`` voxel-downsampled at 0.01, ``[V, 3]``."""
    pts = depth_points(mesh)
    if len(pts) == 0:
        raise Hi3DError("the mesh is not seen by any protocol camera (nothing within radius 1.5 of the origin?)")
    return voxel_down_sample(pts, VOXEL_SIZE)


def chamfer(pred_points: np.ndarray, gt_points: np.ndarray) -> float:
    """``(mean NN distance pred -> gt + mean NN distance gt -> pred) / 2``, unsquared."""
    d0 = cKDTree(gt_points).query(pred_points, k=1, workers=1)[0]
    d1 = cKDTree(pred_points).query(gt_points, k=1, workers=1)[0]
    return float((d0.mean() + d1.mean()) / 2)


def occupancy(mesh: trimesh.Trimesh, size: int = IOU_SIZE) -> np.ndarray:
    """``[size]³`` bool: ``mesh2sdf.compute(vertices, faces, size, fix=False) < 0`` (vertices in [-1, 1])."""
    import mesh2sdf

    sdf = mesh2sdf.compute(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64), size,
                           fix=False, return_mesh=False)
    return sdf < 0


def volume_iou(pred: trimesh.Trimesh, gt: trimesh.Trimesh, size: int = IOU_SIZE) -> float:
    """``|occ(pred) ∧ occ(gt)| / |occ(pred) ∨ occ(gt)|`` of ``occupancy`` (0 when both are empty)."""
    a, b = occupancy(pred, size), occupancy(gt, size)
    union = int(np.logical_or(a, b).sum())
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def mesh_metrics(pred: trimesh.Trimesh, gt: trimesh.Trimesh, gt_points: np.ndarray | None = None) -> dict[str, float]:
    """``{"chamfer", "volume_iou"}`` of ``pred`` against ``gt``, both in hi3d's world (the render frame).
    ``gt_points``: the GT's ``surface_cloud`` when already computed."""
    gt_points = surface_cloud(gt) if gt_points is None else gt_points
    return {"chamfer": chamfer(surface_cloud(pred), gt_points), "volume_iou": volume_iou(pred, gt)}


# ------------------------------------------------------------------------------------------------ views

def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR per image ``[N]`` of ``[N, H, W, 3]`` on [0, 1] as ``compute_psnr_float``: float32 MSE, no floor."""
    mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        return torch.from_numpy(10 * np.log10(1 / mse.numpy()))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM per image ``[N]`` by torchmetrics' ``structural_similarity_index_measure`` with its defaults."""
    from torchmetrics.functional import structural_similarity_index_measure

    out = [structural_similarity_index_measure(p.permute(2, 0, 1)[None].float(), t.permute(2, 0, 1)[None].float())
           for p, t in zip(pred, target)]
    return torch.stack([o.reshape(()) for o in out]).double()


def view_metrics(pred: torch.Tensor, target: torch.Tensor, lpips_model=None) -> dict[str, float]:
    """Means over views of PSNR, SSIM (and LPIPS VGG on [-1, 1] with ``lpips_model``, a
    ``hi3d.eval.metrics.LPIPS``) of ``[N, H, W, 3]`` views on white in [0, 1]."""
    return metrics.view_metrics(pred, target, lpips_model, psnr_fn=psnr, ssim_fn=ssim)
