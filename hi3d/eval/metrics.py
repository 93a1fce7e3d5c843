"""Image and mesh metrics for evaluation: PSNR, SSIM, LPIPS, Chamfer distance, volume IoU, F-score,
CLIP similarity, and mesh alignment (none / ICP).

Mesh metrics take ``trimesh.Trimesh`` objects in the same world frame (hi3d's +Z-up unit cube); every
random step (surface sampling, ICP initial samples) takes a ``seed`` so results are reproducible.

Chamfer distance follows SyncDreamer's GSO protocol (``eval_mesh.py``): points on both surfaces, the
Euclidean (L2, not squared) nearest-neighbour distance in each direction, averaged over the points, and the
mean of the two directions: ``CD = (mean_p min_q |p - q| + mean_q min_p |q - p|) / 2``. Unsquared distances
are in world units (the unit cube), so CD of concentric spheres r1, r2 is ~|r1 - r2|.
"""

from __future__ import annotations

import numpy as np
import trimesh
from scipy.spatial import cKDTree

DEFAULT_POINTS = 100_000
IOU_RESOLUTION = 64


# ----------------------------------------------------------------------------------------------- meshes

def sample_surface(mesh: trimesh.Trimesh, num_points: int = DEFAULT_POINTS, seed: int = 0) -> np.ndarray:
    """``[num_points, 3]`` float64 points uniform in area on the triangles of ``mesh`` (seeded)."""
    tris = np.asarray(mesh.triangles, dtype=np.float64)
    area = np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1) / 2
    if not np.isfinite(area).all() or area.sum() <= 0:
        raise ValueError("mesh has no triangle area to sample")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(tris), size=num_points, p=area / area.sum())
    u, v = rng.random((2, num_points))
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tris[face]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


def nearest_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each point of ``a [N, 3]`` the Euclidean distance to its nearest point in ``b [M, 3]``: ``[N]``."""
    return cKDTree(b).query(a, k=1, workers=1)[0]


def chamfer_distance(pred: trimesh.Trimesh, gt: trimesh.Trimesh, num_points: int = DEFAULT_POINTS,
                     seed: int = 0) -> float:
    """Symmetric Chamfer distance (L2, unsquared; see module docstring), world units."""
    p, g = sample_surface(pred, num_points, seed), sample_surface(gt, num_points, seed + 1)
    return float((nearest_distances(p, g).mean() + nearest_distances(g, p).mean()) / 2)


def f_score(pred: trimesh.Trimesh, gt: trimesh.Trimesh, threshold: float = 0.05,
            num_points: int = DEFAULT_POINTS, seed: int = 0) -> dict[str, float]:
    """Precision (pred points within ``threshold`` of gt), recall (the reverse) and their harmonic mean."""
    p, g = sample_surface(pred, num_points, seed), sample_surface(gt, num_points, seed + 1)
    precision = float((nearest_distances(p, g) < threshold).mean())
    recall = float((nearest_distances(g, p) < threshold).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f_score": f}


def grid_points(bounds: np.ndarray, resolution: int = IOU_RESOLUTION) -> tuple[np.ndarray, ...]:
    """Cell centres of a ``resolution``³ grid over the box ``bounds [[min xyz], [max xyz]]``: 3 axes ``[R]``."""
    lo, hi = np.asarray(bounds, dtype=np.float64)
    return tuple(lo[a] + (np.arange(resolution) + 0.5) * (hi[a] - lo[a]) / resolution for a in range(3))


# tiny irrational offsets of the ray lines so no ray passes exactly through a triangle edge or vertex
_RAY_JITTER = (1.2345678e-7, 2.7182818e-7, 1.4142135e-7)


def _axis_crossings(tris: np.ndarray, axes: tuple[np.ndarray, ...], axis: int, chunk: int = 2_000_000):
    """Intersections of the grid's ray lines parallel to ``axis`` with triangles ``[F, 3, 3]``.

    Returns ``(column index [K] into the R×R lines, coordinate along axis [K])``.
    """
    u_ax, v_ax = [a for a in range(3) if a != axis]
    gu, gv = axes[u_ax] + _RAY_JITTER[u_ax], axes[v_ax] + _RAY_JITTER[v_ax]
    R = len(gu)
    du, dv = gu[1] - gu[0] if R > 1 else 1.0, gv[1] - gv[0] if R > 1 else 1.0
    P = tris[:, :, [u_ax, v_ax]]  # [F, 3, 2]
    lo_u = np.clip(np.ceil((P[:, :, 0].min(1) - gu[0]) / du), 0, R).astype(np.int64)
    hi_u = np.clip(np.floor((P[:, :, 0].max(1) - gu[0]) / du) + 1, 0, R).astype(np.int64)
    lo_v = np.clip(np.ceil((P[:, :, 1].min(1) - gv[0]) / dv), 0, R).astype(np.int64)
    hi_v = np.clip(np.floor((P[:, :, 1].max(1) - gv[0]) / dv) + 1, 0, R).astype(np.int64)
    nu, nv = np.maximum(hi_u - lo_u, 0), np.maximum(hi_v - lo_v, 0)
    count = nu * nv
    cols, coords = [], []
    faces = np.nonzero(count)[0]
    # candidate (triangle, column) pairs in chunks so huge triangles do not blow memory
    cum = np.cumsum(count[faces])
    start = 0
    while start < len(faces):
        base = cum[start - 1] if start else 0
        stop = max(int(np.searchsorted(cum, base + chunk, side="right")), start + 1)
        f = faces[start:stop]
        n = count[f]
        fi = np.repeat(f, n)
        k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        iu = lo_u[fi] + k // nv[fi]
        iv = lo_v[fi] + k % nv[fi]
        q = np.stack([gu[iu], gv[iv]], -1)
        a, b, c = P[fi, 0], P[fi, 1], P[fi, 2]
        d = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            l1 = ((q[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (q[:, 1] - a[:, 1])) / d
            l2 = ((b[:, 0] - a[:, 0]) * (q[:, 1] - a[:, 1]) - (q[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])) / d
            l0 = 1 - l1 - l2
        hit = (d != 0) & (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
        z = tris[fi, 0, axis] * l0 + tris[fi, 1, axis] * l1 + tris[fi, 2, axis] * l2
        cols.append((iu * R + iv)[hit])
        coords.append(z[hit])
        start = stop
    if not cols:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(cols), np.concatenate(coords)


def occupancy(mesh: trimesh.Trimesh, bounds: np.ndarray, resolution: int = IOU_RESOLUTION) -> np.ndarray:
    """``[R, R, R]`` bool occupancy of the grid cell centres (indexed x, y, z) by ray-parity voting.

    For each of the 6 directions ±x, ±y, ±z a ray from every cell centre counts its crossings with the
    surface; an odd count is a vote for "inside". A centre is inside with at least 4 of 6 votes. For a
    closed surface all 6 agree; holes and stray open sheets flip only the few rays that pass through them,
    so non-watertight meshes still give the right volume. (Interpenetrating closed parts: their overlap
    counts as outside, as parity defines it.)
    """
    tris = np.asarray(mesh.triangles, dtype=np.float64)
    axes = grid_points(bounds, resolution)
    R = resolution
    votes = np.zeros((R, R, R), np.int8)
    for axis in range(3):
        col, z = _axis_crossings(tris, axes, axis)
        g = axes[axis]
        # crossings below each cell centre along its line: histogram of crossings by the first centre above
        hist = np.zeros((R * R, R + 1), np.int64)
        np.add.at(hist, (col, np.searchsorted(g, z, side="right")), 1)
        below = np.cumsum(hist, 1)[:, :R]
        total = hist.sum(1, keepdims=True)
        v = (below % 2 == 1).astype(np.int8) + ((total - below) % 2 == 1).astype(np.int8)  # [R*R (u,v), R]
        v = v.reshape(R, R, R)  # (u, v, axis) -> move axis into place
        votes += np.moveaxis(v, 2, axis)
    return votes >= 4


def iou_bounds(*meshes: trimesh.Trimesh, pad: float = 0.02) -> np.ndarray:
    """A cube containing all ``meshes`` (their union bounding box made cubic, padded by ``pad`` of its side)."""
    lo = np.min([m.bounds[0] for m in meshes], 0)
    hi = np.max([m.bounds[1] for m in meshes], 0)
    center, side = (lo + hi) / 2, float(np.max(hi - lo)) * (1 + 2 * pad)
    return np.stack([center - side / 2, center + side / 2])


def volume_iou(pred: trimesh.Trimesh, gt: trimesh.Trimesh, resolution: int = IOU_RESOLUTION,
               bounds: np.ndarray | None = None) -> float:
    """Intersection over union of the occupancy (see ``occupancy``) of both meshes on one ``resolution``³
    grid over ``bounds`` (default: the union bounding cube of both meshes). Deterministic."""
    bounds = iou_bounds(pred, gt) if bounds is None else np.asarray(bounds, dtype=np.float64)
    a, b = occupancy(pred, bounds, resolution), occupancy(gt, bounds, resolution)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
