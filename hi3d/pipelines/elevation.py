"""Elevation of the input view from the silhouettes of a stage-1 orbit (``hi3d generate --elevation auto``).

Stage 1 orbits the object at the elevation it is conditioned on, while frame 0 is the input, seen from
its true elevation e*. Given a probe orbit generated at a guess g, the visual hull carved from the
silhouettes of frames 1..N-1 (cameras at elevation g) is projected at frame 0's azimuth and candidate
elevations; the candidate whose projection best matches frame 0's silhouette is the estimate. Both
silhouettes are cropped to their bounding box and stretched to a fixed square (the input was re-framed, so
absolute size and position carry no information); the score is the soft IoU of the two normalised
silhouettes. The aspect ratio is an elevation cue too, but the hull's projection is a superset of the
object's silhouette whose excess changes the aspect with elevation; on rendered orbits (128², five real
objects, 60 cases, scripts/benchmarks/elevation.py) stretching measured best: mean abs error 3.6° vs 4.6°
with the aspect kept and 4.2° for half of each (``aspect_weight``).
``auto_elevation`` re-probes at the estimate (up to ``rounds`` stage-1 runs) since the hull's excess pulls
estimates far from the probe's elevation towards it.

Assumption: the generator orbits the object around its true upright axis whatever g is. A generator that
instead keeps its frames consistent with a tilted object gives no signal (every candidate then fits at g).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hi3d import cameras
from hi3d.recon.hull import carve


@dataclasses.dataclass
class ElevationConfig:
    """``hi3d generate --elevation auto`` (``auto_elevation.*`` keys). Angles in degrees."""

    enabled: bool = False
    guess: float = 20.0  # elevation the probe orbit is generated at
    tolerance: float = 5.0  # an estimate within this of the probe's elevation keeps the probe as stage 1's output
    rounds: int = 2  # probes at most: each round re-generates the probe at the previous estimate
    min_deg: float = -20.0  # candidate range
    max_deg: float = 50.0
    coarse_step: float = 2.0
    fine_step: float = 0.5  # refinement around the best coarse candidate (± coarse_step)
    grid_resolution: int = 96  # voxels per side of the hull grid
    grid_extent: float = 0.75  # half side of the hull grid (world units; objects fill the unit cube)
    hull_image_size: int = 128  # silhouettes are area-downsampled to this size before carving
    dilate: int = 1  # silhouettes dilated by this many pixels (at hull_image_size) before carving
    carve_slack: int = 0  # a voxel survives when outside at most this many silhouettes (> 0: tolerate bad frames)
    render_resolution: int = 128  # hull projection, pixels
    compare_resolution: int = 64  # normalised silhouettes compared at this size
    aspect_weight: float = 0.0  # score = (1 - w) IoU(stretched to the box) + w IoU(aspect ratio kept)
    alpha_threshold: float = 0.5  # frames' alpha above this is object


def _grid_points(resolution: int, extent: float) -> torch.Tensor:
    """Voxel centres ``[D, D, D, 3]`` (float32, world units) of the grid over ``[-extent, extent]^3``."""
    c = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 * extent - extent
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1)


def _downsample_mask(alpha: torch.Tensor, size: int) -> torch.Tensor:
    """``alpha [N, H, W]`` in [0, 1] -> area-averaged ``[N, size, size]``."""
    return F.interpolate(alpha[:, None].float(), size=(size, size), mode="area")[:, 0]


def visual_hull(masks: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, resolution: int = 96,
                extent: float = 0.75, slack: int = 0, dilate: int = 0) -> torch.Tensor:
    """Occupancy ``[D, D, D]`` bool (D = ``resolution``, axis order x, y, z over ``[-extent, extent]^3``) of
    the voxels whose centre projects inside at least ``N - slack`` of the silhouettes.

    ``masks [N, h, w]`` float in [0, 1] (coverage; > 0 counts as inside), dilated by ``dilate`` pixels first
    (keeps parts thinner than a voxel's footprint),
    ``c2w [N, 4, 4]`` OpenCV cameras, ``K [N, 3, 3]`` or ``[3, 3]`` intrinsics for ``h x w`` pixels.
    A centre outside a view's image counts as outside that silhouette.
    """
    dilated = F.max_pool2d(masks[:, None].float(), 2 * dilate + 1, 1, dilate)[:, 0] > 0
    pts = _grid_points(resolution, extent).reshape(-1, 3)
    return carve(pts, dilated, c2w.float(), K, slack).reshape(resolution, resolution, resolution)


def hull_points(occupancy: torch.Tensor, extent: float, supersample: int = 2) -> torch.Tensor:
    """World points ``[P, 3]`` on a ``supersample^3`` lattice inside each boundary voxel of an occupancy grid
    (as from ``visual_hull``); the interior cannot change a silhouette."""
    occ = occupancy.float()[None, None]
    interior = -F.max_pool3d(-F.pad(occ, (1,) * 6), 3, 1, 0)[0, 0] > 0.5
    boundary = occupancy & ~interior
    voxel = 2 * extent / occupancy.shape[0]
    centres = (boundary.nonzero().float() + 0.5) * voxel - extent
    o = (torch.arange(supersample, dtype=torch.float32) + 0.5) / supersample * voxel - voxel / 2
    offsets = torch.stack(torch.meshgrid(o, o, o, indexing="ij"), -1).reshape(-1, 3)
    return (centres[:, None] + offsets[None]).reshape(-1, 3)


def splat(points: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Silhouette ``[height, width]`` float {0, 1}: pixels hit by world ``points [P, 3]`` seen by one camera."""
    uv, z = cameras.project(points, c2w.float(), K.float())
    col, row = uv[:, 0].floor().long(), uv[:, 1].floor().long()
    ok = (z > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    image = torch.zeros(height * width)
    image[row[ok] * width + col[ok]] = 1.0
    return image.reshape(height, width)


def project_hull(occupancy: torch.Tensor, extent: float, c2w: torch.Tensor, K: torch.Tensor, width: int,
                 height: int, supersample: int = 2) -> torch.Tensor:
    """Silhouette ``[height, width]`` float {0, 1} of an occupancy grid seen by one camera (``c2w [4, 4]``,
    ``K [3, 3]``): ``hull_points`` splatted to their pixels."""
    return splat(hull_points(occupancy, extent, supersample), c2w, K, width, height)


def normalise_silhouette(mask: torch.Tensor, size: int, keep_aspect: bool = True,
                         threshold: float = 0.5) -> torch.Tensor | None:
    """``mask [H, W]`` float in [0, 1] -> ``[size, size]``: its bounding box (pixels > ``threshold``) scaled so
    the longer side spans ``size`` and centred (``keep_aspect``), or stretched to fill the square. None if empty."""
    on = mask > threshold
    if not on.any():
        return None
    rows, cols = on.any(1).nonzero()[:, 0], on.any(0).nonzero()[:, 0]
    crop = mask[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1].float()
    h, w = crop.shape
    if keep_aspect:
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
    else:
        nh = nw = size
    crop = F.interpolate(crop[None, None], size=(nh, nw), mode="bilinear", align_corners=False,
                         antialias=True)[0, 0].clamp(0, 1)
    out = torch.zeros(size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = crop
    return out


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two soft masks in [0, 1]: sum(min) / sum(max)."""
    return float(torch.minimum(a, b).sum() / torch.maximum(a, b).sum().clamp_min(1e-8))


def estimate_elevation(rgba: torch.Tensor, guess_deg: float, cfg: ElevationConfig | None = None,
                       azimuth_deg: torch.Tensor | None = None, radius: float = cameras.DEFAULT_RADIUS,
                       fov_deg: float = cameras.DEFAULT_FOV_DEG) -> tuple[float, torch.Tensor]:
    """Elevation (degrees) of frame 0 of an orbit whose frames 1..N-1 were generated at ``guess_deg``.

    ``rgba [N, H, W, 4]`` float in [0, 1] (alpha = object), square frames with FOV ``fov_deg``, cameras at
    ``radius`` looking at the origin, azimuths ``azimuth_deg [N]`` (default: evenly spaced from 0, as stage 1).
    Returns ``(estimate, scores [M, 2])``: candidate elevations and their soft IoU, sorted by elevation.
    With an empty frame-0 silhouette or hull there is no signal: returns ``(guess_deg, empty scores)``.
    """
    cfg = cfg or ElevationConfig()
    N, H, W, _ = rgba.shape
    az = cameras.orbit_azimuths(N) if azimuth_deg is None else torch.as_tensor(azimuth_deg, dtype=torch.float64)
    alpha = (rgba[..., 3].float() > cfg.alpha_threshold).float()
    weights = {False: 1.0 - cfg.aspect_weight, True: cfg.aspect_weight}
    targets = {keep: normalise_silhouette(alpha[0], cfg.compare_resolution, keep) for keep in (False, True)}
    masks = _downsample_mask(alpha[1:], cfg.hull_image_size)
    c2w = cameras.orbit_c2w(az[1:], torch.full((N - 1,), float(guess_deg), dtype=torch.float64), radius)
    K = cameras.intrinsics(cfg.hull_image_size, cfg.hull_image_size, fov_deg)
    hull = visual_hull(masks, c2w, K, cfg.grid_resolution, cfg.grid_extent, cfg.carve_slack, cfg.dilate)
    empty = torch.zeros(0, 2, dtype=torch.float64)
    if targets[False] is None or not hull.any():
        return float(guess_deg), empty
    Kr = cameras.intrinsics(cfg.render_resolution, cfg.render_resolution, fov_deg)
    points = hull_points(hull, cfg.grid_extent)
    scores: dict[float, float] = {}

    def score(el: float) -> None:
        el = round(el, 6)
        if el in scores:
            return
        sil = splat(points, cameras.orbit_c2w(az[0], torch.tensor(el), radius), Kr, cfg.render_resolution,
                    cfg.render_resolution)
        scores[el] = 0.0
        for keep, w in weights.items():
            norm = normalise_silhouette(sil, cfg.compare_resolution, keep) if w > 0 else None
            scores[el] += 0.0 if norm is None else w * soft_iou(norm, targets[keep])

    n = int(math.floor((cfg.max_deg - cfg.min_deg) / cfg.coarse_step + 1e-9)) + 1
    for i in range(n):
        score(cfg.min_deg + i * cfg.coarse_step)
    best = max(scores, key=scores.get)
    m = int(round(cfg.coarse_step / cfg.fine_step))
    for i in range(-m, m + 1):
        el = best + i * cfg.fine_step
        if cfg.min_deg <= el <= cfg.max_deg:
            score(el)
    best = max(scores, key=scores.get)
    table = torch.tensor(sorted(scores.items()), dtype=torch.float64)
    return float(best), table


def auto_elevation(probe: Callable[[int, float], torch.Tensor], cfg: ElevationConfig | None = None) -> dict:
    """Estimate, re-probe at the estimate, repeat: ``probe(round, elevation_deg) -> rgba [N, H, W, 4]`` makes (or
    loads) the stage-1 orbit of round ``round`` generated at that elevation (standard stage-1 cameras).

    Round k probes at the previous estimate (round 0 at ``cfg.guess``); it stops when an estimate lies within
    ``cfg.tolerance`` of its probe's elevation (that probe is then stage 1's output: ``final_round`` = k), when
    there is no signal, or after ``cfg.rounds`` rounds (stage 1 then runs at the last estimate:
    ``final_round`` None). Returns ``{"elevation": to condition stage 1 on, "guess", "estimate" (last),
    "final_round", "rerun_stage1", "signal", "rounds": [{"probe", "estimate", "scores": [[deg, iou], ...]}]}``.
    """
    cfg = cfg or ElevationConfig()
    rounds, at = [], cfg.guess
    for k in range(max(1, cfg.rounds)):
        estimate, scores = estimate_elevation(probe(k, at), at, cfg)
        rounds.append({"probe": at, "estimate": estimate,
                       "scores": [[round(e, 3), round(v, 5)] for e, v in scores.tolist()]})
        if abs(estimate - at) <= cfg.tolerance or not len(scores):
            return {"elevation": at, "guess": cfg.guess, "estimate": estimate, "final_round": k,
                    "rerun_stage1": False, "signal": len(scores) > 0, "rounds": rounds}
        at = estimate
    return {"elevation": at, "guess": cfg.guess, "estimate": at, "final_round": None, "rerun_stage1": True,
            "signal": True, "rounds": rounds}
