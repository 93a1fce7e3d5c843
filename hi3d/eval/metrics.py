"""Image and mesh metrics for evaluation: PSNR, SSIM, LPIPS, Chamfer distance, volume IoU, F-score,
CLIP similarity, and mesh alignment (none / ICP).

Mesh metrics take ``trimesh.Trimesh`` objects in the same world frame (hi3d's +Z-up unit cube); every
random step (surface sampling, ICP initial samples) takes a ``seed`` so results are reproducible.

Chamfer distance follows SyncDreamer's GSO protocol (``eval_mesh.py``): points on both surfaces, the
Euclidean (L2, not squared) nearest-neighbour distance in each direction, averaged over the points, and the
mean of the two directions: ``CD = (mean_p min_q |p - q| + mean_q min_p |q - p|) / 2``. Unsquared distances
are in world units (the unit cube), so CD of concentric spheres r1, r2 is ~|r1 - r2|. Both surfaces are
sampled with the same seed, so a prediction identical to the ground truth scores exactly 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from scipy.spatial import cKDTree

from hi3d.errors import Hi3DError

DEFAULT_POINTS = 100_000
IOU_RESOLUTION = 64


# ----------------------------------------------------------------------------------------------- images

def _as_nchw(images: torch.Tensor) -> torch.Tensor:
    """``[H, W, C]`` or ``[N, H, W, C]`` (channels last, as ``Orbit``) -> float64 ``[N, C, H, W]``."""
    x = images.detach().to(torch.float64)
    x = x[None] if x.ndim == 3 else x
    return x.permute(0, 3, 1, 2)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image of ``[N, H, W, C]`` (or one ``[H, W, C]``) images in ``[0, data_range]``: ``[N]``.
    MSE is floored at 1e-10 ``data_range``², so identical images score 100 dB (finite, for tables)."""
    mse = ((_as_nchw(pred) - _as_nchw(target)) ** 2).flatten(1).mean(1).clamp_min(1e-10 * data_range ** 2)
    return 10 * torch.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian ``[size]`` (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004): Gaussian window ``window``² with σ ``sigma``, statistics at
    every position where the window fits inside the image ('valid'), averaged over positions and channels.
    ``[N, H, W, C]`` (or ``[H, W, C]``) in ``[0, data_range]`` -> ``[N]``."""
    x, y = _as_nchw(pred), _as_nchw(target)
    C = x.shape[1]
    g = gaussian_window(window, sigma)
    wx = g.view(1, 1, 1, -1).repeat(C, 1, 1, 1)
    wy = g.view(1, 1, -1, 1).repeat(C, 1, 1, 1)
    blur = lambda t: F.conv2d(F.conv2d(t, wx, groups=C), wy, groups=C)  # noqa: E731  separable Gaussian
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return m.flatten(1).mean(1)


def ssim_reference(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0, window: int = 11,
                   sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Direct evaluation of the SSIM definition window by window (slow; for tests). ``[H, W, C]`` arrays."""
    g = gaussian_window(window, sigma).numpy()
    w = np.outer(g, g)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    H, W, C = pred.shape
    vals = []
    for c in range(C):
        for i in range(H - window + 1):
            for j in range(W - window + 1):
                a = pred[i:i + window, j:j + window, c].astype(np.float64)
                b = target[i:i + window, j:j + window, c].astype(np.float64)
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def lpips_backbone_path(net: str, weights: str | Path | None = None) -> Path:
    """The torchvision ImageNet weights of LPIPS' backbone: ``weights`` if given, else the torch hub cache."""
    if net not in LPIPS_BACKBONE_FILES:
        raise Hi3DError(f"LPIPS net '{net}' unknown (use one of {sorted(LPIPS_BACKBONE_FILES)})")
    name = LPIPS_BACKBONE_FILES[net]
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        raise Hi3DError(f"LPIPS-{net} needs the torchvision backbone weights {name}: not found at {path}; "
                        f"download it (torchvision {'vgg16' if net == 'vgg' else 'alexnet'} IMAGENET1K_V1) and put "
                        f"it there or pass its path")
    return path


class LPIPS(torch.nn.Module):
    """LPIPS (Zhang et al. 2018) through the ``lpips`` package: its linear layers ship in the wheel, the
    torchvision backbone (VGG16 or AlexNet) is read from a local file (``lpips_backbone_path``), never
    downloaded. ``random_backbone=True`` builds an untrained backbone (tests)."""

    def __init__(self, net: str = "vgg", weights: str | Path | None = None, random_backbone: bool = False):
        super().__init__()
        import warnings

        import lpips as lpips_pkg

        path = None if random_backbone else lpips_backbone_path(net, weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = lpips_pkg.LPIPS(net=net, pnet_rand=True, verbose=False)
        if not random_backbone:
            state = torch.load(path, map_location="cpu", weights_only=True)
            own = self.model.net.state_dict()
            index = {k.split(".", 1)[1]: k for k in own}  # "0.weight" -> "slice1.0.weight"
            mapped = {index[k[len("features."):]]: v for k, v in state.items()
                      if k.startswith("features.") and k[len("features."):] in index}
            if len(mapped) != len(own):
                raise Hi3DError(f"{weights or net}: not torchvision {net} weights ({len(mapped)}/{len(own)} tensors match)")
            self.model.net.load_state_dict(mapped)
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[N, H, W, 3]`` (or ``[H, W, 3]``) in [0, 1] -> LPIPS distance per image ``[N]``."""
        x, y = (_as_nchw(t).float() * 2 - 1 for t in (pred, target))
        return self.model(x[:, :3], y[:, :3]).flatten().double()


class ClipScorer:
    """Cosine similarity of CLIP embeddings (open_clip) between an input image or prompt and views."""

    def __init__(self, model, preprocess, tokenizer=None, device: str | torch.device = "cpu"):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, model_name: str, weights: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
        """open_clip ``model_name`` (e.g. ``ViT-B-32``) with weights from the local file ``weights``."""
        import open_clip

        if model_name not in open_clip.list_models():
            raise Hi3DError(f"open_clip model '{model_name}' unknown (see open_clip.list_models())")
        if not weights or not Path(weights).is_file():
            raise Hi3DError(f"CLIP weights for {model_name} not found at {weights}: download the open_clip "
                            f"checkpoint (e.g. open_clip_pytorch_model.bin) and pass its path")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights), device=device)
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), device)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, H, W, 3]`` in [0, 1] -> unit embeddings ``[N, D]``."""
        from PIL import Image

        from hi3d.io import to_uint8

        ims = images[None] if images.ndim == 3 else images
        batch = torch.stack([self.preprocess(Image.fromarray(to_uint8(im[..., :3]))) for im in ims]).to(self.device)
        return F.normalize(self.model.encode_image(batch).double(), dim=-1)

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise Hi3DError("this CLIP scorer has no tokenizer; build it with ClipScorer.from_pretrained")
        return F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).double(), dim=-1)

    def similarity(self, reference: torch.Tensor | str, views: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``[N]`` between a reference image ``[H, W, 3]`` or a prompt and views ``[N, H, W, 3]``."""
        ref = self.embed_text([reference]) if isinstance(reference, str) else self.embed_images(reference)
        return (self.embed_images(views) @ ref[0]).cpu()


def clip_similarity(scorer: ClipScorer, reference: torch.Tensor | str, views: torch.Tensor) -> float:
    """Mean CLIP cosine similarity between ``reference`` (image or prompt) and ``views``."""
    return float(scorer.similarity(reference, views).mean())


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
    p, g = sample_surface(pred, num_points, seed), sample_surface(gt, num_points, seed)
    return float((nearest_distances(p, g).mean() + nearest_distances(g, p).mean()) / 2)


def f_score(pred: trimesh.Trimesh, gt: trimesh.Trimesh, threshold: float = 0.05,
            num_points: int = DEFAULT_POINTS, seed: int = 0) -> dict[str, float]:
    """Precision (pred points within ``threshold`` of gt), recall (the reverse) and their harmonic mean."""
    p, g = sample_surface(pred, num_points, seed), sample_surface(gt, num_points, seed)
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


def occupancy_votes(mesh: trimesh.Trimesh, bounds: np.ndarray, resolution: int = IOU_RESOLUTION) -> np.ndarray:
    """``[R, R, R]`` int8: for each grid cell centre (indexed x, y, z), how many of the 6 rays ±x, ±y, ±z
    from it cross the surface an odd number of times (votes for "inside", 0..6)."""
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
    return votes


def occupancy(mesh: trimesh.Trimesh, bounds: np.ndarray, resolution: int = IOU_RESOLUTION) -> np.ndarray:
    """``[R, R, R]`` bool occupancy of the grid cell centres (indexed x, y, z) by ray-parity voting: inside
    with at least 4 of the 6 votes of ``occupancy_votes``.

    For a closed surface all 6 agree. On an open mesh the vote closes it up: a cavity or a region behind a
    hole that is walled on at least 4 of the 6 axis directions counts as solid (a cup's inside, a scan's open
    bottom, the body behind a missing patch). That is why this IoU reads higher than the SyncDreamer
    protocol's ``mesh2sdf`` sign (parity along grid lines) or trimesh's containment on open meshes: both
    leave such regions partly empty, and thin or hollow volumes lose more overlap under a misalignment
    than filled ones. ``scripts/benchmarks/gso_protocols.py`` measures the gap. (Interpenetrating closed
    parts: their overlap counts as outside, as parity defines it.)
    """
    return occupancy_votes(mesh, bounds, resolution) >= 4


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


# -------------------------------------------------------------------------------------------- alignment

ALIGN_MODES = ("none", "icp")


def align_icp(pred: trimesh.Trimesh, gt: trimesh.Trimesh, num_points: int = 5000, seed: int = 0,
              scale: bool = True, max_iterations: int = 50, yaw_starts: int = 8) -> tuple[trimesh.Trimesh, np.ndarray]:
    """Rigid (+ uniform scale) ICP of ``pred`` onto ``gt`` for methods with unknown pose.

    Starts from ``yaw_starts`` rotations about +Z (up) around the centroids and keeps the lowest mean
    distance. Returns ``(aligned copy of pred, 4x4 transform applied)``. Deterministic for a seed.
    """
    p, g = sample_surface(pred, num_points, seed), sample_surface(gt, num_points, seed + 1)
    pc, gc = p.mean(0), g.mean(0)
    best = None
    for k in range(yaw_starts):
        a = 2 * math.pi * k / yaw_starts
        init = np.eye(4)
        init[:3, :3] = trimesh.transformations.rotation_matrix(a, [0, 0, 1])[:3, :3]
        init[:3, 3] = gc - init[:3, :3] @ pc
        T, _, cost = trimesh.registration.icp(p, g, initial=init, threshold=1e-7, max_iterations=max_iterations,
                                              reflection=False, scale=scale)
        moved = trimesh.transform_points(p, T)
        d = float(nearest_distances(moved, g).mean() + nearest_distances(g, moved).mean())
        if best is None or d < best[0]:
            best = (d, T)
    out = pred.copy()
    out.apply_transform(best[1])
    return out, best[1]


def align(pred: trimesh.Trimesh, gt: trimesh.Trimesh, mode: str = "none", seed: int = 0) -> trimesh.Trimesh:
    """``pred`` aligned to ``gt``: ``none`` (same normalisation assumed) or ``icp``."""
    if mode == "none":
        return pred
    if mode == "icp":
        return align_icp(pred, gt, seed=seed)[0]
    raise Hi3DError(f"alignment '{mode}' unknown (use one of {ALIGN_MODES})")


def mesh_metrics(pred: trimesh.Trimesh, gt: trimesh.Trimesh, align_mode: str = "none",
                 num_points: int = DEFAULT_POINTS, fscore_threshold: float = 0.05,
                 resolution: int = IOU_RESOLUTION, seed: int = 0) -> dict[str, float]:
    """Chamfer, volume IoU, F-score (with precision/recall) of ``pred`` against ``gt`` after alignment."""
    pred = align(pred, gt, align_mode, seed)
    p, g = sample_surface(pred, num_points, seed), sample_surface(gt, num_points, seed)
    dp, dg = nearest_distances(p, g), nearest_distances(g, p)
    precision, recall = float((dp < fscore_threshold).mean()), float((dg < fscore_threshold).mean())
    return {"chamfer": float((dp.mean() + dg.mean()) / 2),
            "iou": volume_iou(pred, gt, resolution),
            "f_score": 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall),
            "precision": precision, "recall": recall}


def view_metrics(pred: torch.Tensor, target: torch.Tensor, lpips_model: LPIPS | None = None,
                 psnr_fn=None, ssim_fn=None) -> dict[str, float]:
    """Mean PSNR, SSIM (and LPIPS with a model) of views ``[N, H, W, 3]`` in [0, 1] against targets;
    ``psnr_fn`` / ``ssim_fn`` (per image ``[N]``) default to this module's ``psnr`` / ``ssim``."""
    if pred.shape != target.shape:
        raise Hi3DError(f"predicted views {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in shape")
    psnr_fn, ssim_fn = psnr_fn or psnr, ssim_fn or ssim
    out = {"psnr": float(psnr_fn(pred, target).mean()), "ssim": float(ssim_fn(pred, target).mean())}
    if lpips_model is not None:
        out["lpips"] = float(lpips_model(pred, target).mean())
    return out
