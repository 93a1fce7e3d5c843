"""Differentiable 3D Gaussian splatting rasterisation, one interface, two backends.

``rasterize(...)`` picks the backend from the tensors' device: CUDA -> gsplat's ``rasterization``
(imported only there, so a CPU run never compiles CUDA code); CPU -> the plain-torch tile rasteriser
below. ``rasterize_dense`` is the reference: the same math evaluated for every pixel and every
Gaussian, no tiling, plain autograd; tests compare the two forward and backward.

The math (3DGS, Kerbl et al. 2023):
- projection: camera-space covariance ``R Σ Rᵀ``, EWA ``Σ' = J Σ Jᵀ + 0.3 I`` (0.3 px² low-pass) with
  the Jacobian of the pinhole at the mean (its x/z, y/z clamped to 1.3x the field of view, as 3DGS and
  gsplat do), conic ``Σ'⁻¹``; Gaussians with camera z <= ``near`` are culled.
- per pixel ``p`` (centre at +0.5) and Gaussian ``k`` in front-to-back order of the means' camera z:
  ``α_k = min(0.99, o_k exp(-½ dᵀ Σ'⁻¹ d))``, ``α_k := 0`` when ``α_k < 1/255``; ``T_k = Π_{j<k} (1 - α_j)``;
  compositing stops before the first Gaussian that would bring ``T`` below 1e-4 (that Gaussian and all
  behind it are skipped), exactly as the 3DGS CUDA kernel.
- extents: a Gaussian can only reach ``α >= 1/255`` inside the ellipse ``½ dᵀ Σ'⁻¹ d <= ln(255 o)``;
  its bounding box ``±sqrt(2 ln(255 o) Σ'_xx)``, ``±sqrt(2 ln(255 o) Σ'_yy)`` (<= 3.33 σ) selects the
  tiles, so tiling drops only exact zeros and the tile rasteriser equals the dense evaluation.
- outputs: ``rgb = Σ w_k c_k + (1 - alpha) background`` with ``w_k = α_k T_k``, ``alpha = Σ w_k``, and
  ``depth = Σ w_k z_k / alpha`` (expected camera-z depth normalised by alpha, 0 where alpha = 0).

Speed on CPU: pairs (tile, Gaussian) are sorted by tile then depth; tiles are processed in chunks of
similar list length, padded to ``[tiles, K, pixels]`` blocks; the compositing of a block is one
autograd ``Function`` whose backward recomputes alpha and uses the closed-form 3DGS gradient
(``dL/dα_k = T_k h_k - S_k / (1 - α_k)``, ``S_k`` the suffix sum of ``w_j h_j``) instead of storing
every intermediate.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4


class Rendered(NamedTuple):
    """``rgb [H, W, C]``, ``alpha [H, W]``, ``depth [H, W]`` (alpha-normalised camera z), and ``info``:
    ``means2d [N, 2]`` (pixels; in the graph, for densification gradients), ``radii [N]`` (pixels,
    0 = culled), ``width``, ``height``."""

    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    info: dict


class Projected(NamedTuple):
    means2d: torch.Tensor  # [N, 2] pixels
    conics: torch.Tensor  # [N, 3] (a, b, c) of the inverse 2D covariance [[a, b], [b, c]]
    depths: torch.Tensor  # [N] camera z
    extent: torch.Tensor  # [N, 2] half-widths (pixels) of the box where alpha can reach 1/255
    valid: torch.Tensor  # [N] bool


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` quaternions (w, x, y, z; normalised here) -> rotation matrices ``[N, 3, 3]``."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(quats.shape[:-1] + (3, 3))


def project_gaussians(means, quats, scales, opacities, viewmat, K, width: int, height: int,
                      near: float = 0.01, eps2d: float = 0.3) -> Projected:
    """EWA projection of ``N`` Gaussians (means ``[N, 3]`` world, quats ``[N, 4]`` wxyz, scales ``[N, 3]``
    linear, opacities ``[N]`` in [0, 1]) into the camera ``viewmat [4, 4]`` (world -> OpenCV camera),
    ``K [3, 3]``."""
    dt = means.dtype
    viewmat, K = viewmat.to(dt), K.to(dt)
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    mc = means @ R.T + t
    M = R @ quat_to_rotmat(quats) * scales[:, None, :]  # camera-space R S
    cov = M @ M.transpose(1, 2)
    x, y, z = mc.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    zs = z.clamp_min(near)
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    tx = zs * (x / zs).clamp(-(cx / fx + 0.3 * tan_x), (width - cx) / fx + 0.3 * tan_x)
    ty = zs * (y / zs).clamp(-(cy / fy + 0.3 * tan_y), (height - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(zs)
    J = torch.stack([fx / zs, zero, -fx * tx / zs**2, zero, fy / zs, -fy * ty / zs**2], -1).reshape(-1, 2, 3)
    cov2d = J @ cov @ J.transpose(1, 2)
    a, b, c = cov2d[:, 0, 0] + eps2d, cov2d[:, 0, 1], cov2d[:, 1, 1] + eps2d
    det = (a * c - b * b).clamp_min(1e-12)
    conics = torch.stack([c / det, -b / det, a / det], -1)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], -1)
    with torch.no_grad():
        level = torch.log((255.0 * opacities.detach()).clamp_min(1.0))  # ½ dᵀΣ⁻¹d bound where alpha >= 1/255
        extent = torch.stack([(2 * level * a).sqrt(), (2 * level * c).sqrt()], -1) + 1e-3
        valid = (z > near) & (opacities.detach() >= ALPHA_MIN)
        md = means2d.detach()
        valid &= (md[:, 0] + extent[:, 0] > 0) & (md[:, 0] - extent[:, 0] < width)
        valid &= (md[:, 1] + extent[:, 1] > 0) & (md[:, 1] - extent[:, 1] < height)
    return Projected(means2d, conics, z, extent, valid)


def _alpha(pix, xy, conic, opac):
    """Alpha of Gaussians ``[..., K]`` at pixels ``pix [..., P, 2]`` -> ``(raw o·g [..., K, P], g, alpha)``."""
    dx = pix[..., None, :, 0] - xy[..., :, None, 0]
    dy = pix[..., None, :, 1] - xy[..., :, None, 1]
    q = 0.5 * (conic[..., 0, None] * dx * dx + conic[..., 2, None] * dy * dy) + conic[..., 1, None] * dx * dy
    g = torch.exp(-q)
    raw = opac[..., None] * g
    alpha = torch.where(raw >= ALPHA_MIN, raw.clamp_max(ALPHA_MAX), torch.zeros_like(raw))
    return raw, g, alpha, dx, dy


def _weights(alpha: torch.Tensor):
    """Front-to-back along dim -2: ``(w, T_exclusive, included)`` with the 3DGS early stop."""
    one_minus = 1 - alpha
    t_incl = torch.cumprod(one_minus, dim=-2)
    t_excl = torch.cat([torch.ones_like(t_incl[..., :1, :]), t_incl[..., :-1, :]], dim=-2)
    included = t_incl >= T_MIN
    return alpha * t_excl * included, t_excl, included


def _tile_basis(tile_size: int, dtype, device) -> torch.Tensor:
    """``[P, 6]`` monomials ``(1, u, v, u², uv, v²)`` of pixel centres relative to the tile centre."""
    uv = _pixel_centres(tile_size, tile_size, dtype, device).reshape(-1, 2) - tile_size / 2
    u, v = uv.unbind(-1)
    return torch.stack([torch.ones_like(u), u, v, u * u, u * v, v * v], -1)


def _quadratic_coefs(xy, conic, opac, centre):
    """Coefficients ``[..., 6]`` of ``q' = ½ dᵀ Σ'⁻¹ d - ln o`` in the tile basis, so ``o·g = exp(-q')``.

    ``xy [..., 2]`` means, ``conic [..., 3]``, ``opac [...]`` (>= 1/255), ``centre [..., 2]`` tile centres.
    """
    mx, my = (xy - centre).unbind(-1)
    a, b, c = conic.unbind(-1)
    c0 = 0.5 * a * mx * mx + b * mx * my + 0.5 * c * my * my - torch.log(opac)
    return torch.stack([c0, -a * mx - b * my, -b * mx - c * my, 0.5 * a, b, 0.5 * c], -1)


class _TileComposite(torch.autograd.Function):
    """Front-to-back compositing of ``[T, K]`` depth-sorted Gaussians over the ``P`` pixels of ``T`` tiles.

    Inputs: ``coef [T, K, 6]`` (``_quadratic_coefs``), features ``feat [T, K, F]`` (colour, depth, 1),
    ``basis [P, 6]`` (``_tile_basis``). Output ``Σ_k w_k feat_k``: ``[T, P, F]``. The exponent of every
    (Gaussian, pixel) pair is one matmul ``coef @ basisᵀ``; its gradient is ``dL/dq' @ basis``.
    """

    @staticmethod
    def _forward(coef, basis):
        raw = torch.exp(-(coef @ basis.T))  # [T, K, P]
        alpha = torch.where(raw >= ALPHA_MIN, raw.clamp_max(ALPHA_MAX), 0.0)
        one_minus = 1 - alpha
        t_incl = torch.cumprod(one_minus, dim=1)
        t_excl = t_incl / one_minus
        included = t_incl >= T_MIN
        w = torch.where(included, alpha * t_excl, 0.0)
        return raw, alpha, one_minus, t_excl, included, w

    @staticmethod
    def forward(ctx, coef, feat, basis):
        raw, _, _, _, included, w = _TileComposite._forward(coef, basis)
        # Gaussians behind the last one that contributes to any pixel get no gradient: the backward skips them
        reached = (included & (raw >= ALPHA_MIN)).any(-1)  # [T, K]
        ctx.k_used = int(reached.any(0).nonzero().max()) + 1 if reached.any() else 1
        ctx.save_for_backward(coef, feat, basis)
        return torch.bmm(w.transpose(1, 2), feat)

    @staticmethod
    def backward(ctx, grad_out):
        coef_all, feat_all, basis = ctx.saved_tensors
        k = ctx.k_used
        coef, feat = coef_all[:, :k], feat_all[:, :k]
        raw, alpha, one_minus, t_excl, included, w = _TileComposite._forward(coef, basis)
        grad_out = grad_out.contiguous()
        h = torch.bmm(feat, grad_out.transpose(1, 2))  # [T, K, P]: dL/d(w_k) per pixel
        wh = w * h
        suffix = wh.sum(1, keepdim=True) - wh.cumsum(1)  # Σ_{j>k} w_j h_j
        active = included & (raw >= ALPHA_MIN) & (raw <= ALPHA_MAX)
        d_q = torch.where(active, (suffix / one_minus - t_excl * h) * raw, 0.0)  # dL/dq' = -dL/dα · raw
        grad_coef, grad_feat = torch.zeros_like(coef_all), torch.zeros_like(feat_all)
        grad_coef[:, :k] = d_q @ basis
        grad_feat[:, :k] = torch.bmm(w, grad_out)
        return grad_coef, grad_feat, None


def _viewmat(c2w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(c2w.to(torch.float64))


def _finish(acc, H, W, C, background, dtype):
    rgb, depth_acc, alpha = acc[..., :C], acc[..., C], acc[..., C + 1]
    if background is not None:
        rgb = rgb + (1 - alpha[..., None]) * torch.as_tensor(background, dtype=dtype, device=acc.device)
    depth = depth_acc / alpha.clamp_min(1e-10)
    return rgb, alpha, depth


def rasterize_dense(means, quats, scales, opacities, colors, c2w, K, width: int, height: int,
                    background=None, near: float = 0.01, eps2d: float = 0.3) -> Rendered:
    """Reference: every pixel against every Gaussian (``[H·W, N]`` tensors), plain autograd. Small scenes only."""
    proj = project_gaussians(means, quats, scales, opacities, _viewmat(c2w), K, width, height, near, eps2d)
    idx = torch.nonzero(proj.valid).squeeze(1)
    idx = idx[torch.argsort(proj.depths.detach()[idx], stable=True)]
    C = colors.shape[-1]
    pix = _pixel_centres(width, height, means.dtype, means.device).reshape(-1, 2)
    feat = torch.cat([colors, proj.depths[:, None], torch.ones_like(proj.depths)[:, None]], -1)[idx]
    _, _, alpha, _, _ = _alpha(pix, proj.means2d[idx], proj.conics[idx], opacities[idx])  # [N, P]
    w, _, _ = _weights(alpha)
    acc = (w.T @ feat).reshape(height, width, C + 2)
    rgb, alpha_img, depth = _finish(acc, height, width, C, background, means.dtype)
    return Rendered(rgb, alpha_img, depth, _info(proj, width, height))


def _info(proj: Projected, width: int, height: int) -> dict:
    radii = torch.where(proj.valid, proj.extent.max(-1).values.ceil(), torch.zeros_like(proj.depths.detach()))
    return {"means2d": proj.means2d, "radii": radii, "width": width, "height": height}


def _pixel_centres(width, height, dtype, device):
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype, device=device) + 0.5,
                          torch.arange(width, dtype=dtype, device=device) + 0.5, indexing="ij")
    return torch.stack([u, v], -1)


@torch.no_grad()
def bin_tiles(proj: Projected, width: int, height: int, tile_size: int):
    """Sorted (tile, Gaussian) pairs: ``(gauss_ids [M], tile_ids [M], tile_start [T], tile_count [T])``,
    sorted by tile, then by camera z of the mean (front to back), ties by index."""
    tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
    idx = torch.nonzero(proj.valid).squeeze(1)
    idx = idx[torch.argsort(proj.depths[idx], stable=True)]
    m, e = proj.means2d.detach()[idx], proj.extent[idx]
    lo = torch.floor((m - e) / tile_size).long()
    hi = torch.floor((m + e) / tile_size).long()
    lo[:, 0].clamp_(0, tw - 1), lo[:, 1].clamp_(0, th - 1)
    hi[:, 0].clamp_(0, tw - 1), hi[:, 1].clamp_(0, th - 1)
    bw = hi[:, 0] - lo[:, 0] + 1
    counts = bw * (hi[:, 1] - lo[:, 1] + 1)
    owner = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), counts)
    local = torch.arange(len(owner), device=idx.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    tx = lo[owner, 0] + local % bw[owner]
    ty = lo[owner, 1] + local // bw[owner]
    tile_ids, order = torch.sort(ty * tw + tx, stable=True)
    gauss_ids = idx[owner[order]]
    tile_count = torch.bincount(tile_ids, minlength=tw * th)
    tile_start = tile_count.cumsum(0) - tile_count
    return gauss_ids, tile_ids, tile_start, tile_count


def _chunks(tile_count: torch.Tensor, tile_pixels: int, budget: int, min_fill: float = 0.6):
    """Groups of non-empty tiles, longest lists first; a group is padded to its longest list, so a new
    group starts when the block would exceed ``budget`` elements or lists shrink below ``min_fill``."""
    order = torch.argsort(tile_count, descending=True, stable=True)
    counts = tile_count[order].tolist()
    groups, start = [], 0
    while start < len(counts) and counts[start] > 0:
        kmax, end = counts[start], start + 1
        while (end < len(counts) and counts[end] > 0 and counts[end] >= min_fill * kmax
               and (end - start + 1) * kmax * tile_pixels <= budget):
            end += 1
        groups.append((order[start:end], kmax))
        start = end
    return groups


def rasterize_tiles(means, quats, scales, opacities, colors, c2w, K, width: int, height: int,
                    background=None, near: float = 0.01, eps2d: float = 0.3, tile_size: int = 8,
                    chunk_elements: int = 1 << 21) -> Rendered:
    """The CPU tile rasteriser (plain torch); same results as ``rasterize_dense``.

    ``chunk_elements`` bounds the ``[tiles, K, pixels]`` block evaluated at once (a few times that many floats
    are live in the backward); small blocks stay in cache.
    """
    dt, dev = means.dtype, means.device
    C = colors.shape[-1]
    proj = project_gaussians(means, quats, scales, opacities, _viewmat(c2w), K, width, height, near, eps2d)
    gauss_ids, tile_ids, tile_start, tile_count = bin_tiles(proj, width, height, tile_size)
    tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
    P = tile_size * tile_size
    feat = torch.cat([colors, proj.depths[:, None], torch.ones_like(proj.depths)[:, None]], -1)
    basis = _tile_basis(tile_size, dt, dev)
    # every (tile, Gaussian) pair's exponent coefficients and features at once, then one gather per chunk;
    # row M is the padding: exp(-1e4) = 0, no features
    centre = (torch.stack([tile_ids % tw, tile_ids // tw], -1).to(dt) + 0.5) * tile_size
    pairs = torch.cat([_quadratic_coefs(proj.means2d[gauss_ids], proj.conics[gauss_ids], opacities[gauss_ids],
                                        centre), feat[gauss_ids]], -1)  # [M, 6 + C + 2]
    pad = torch.zeros(1, pairs.shape[1], dtype=dt, device=dev)
    pad[0, 0] = 1e4
    pairs = torch.cat([pairs, pad])
    outputs, tiles_done = [], []
    for tiles, kmax in _chunks(tile_count, P, chunk_elements):
        ar = torch.arange(kmax, device=dev)
        rows = torch.where(ar < tile_count[tiles, None], tile_start[tiles, None] + ar, len(gauss_ids))
        block = pairs.index_select(0, rows.flatten()).view(len(tiles), kmax, -1)  # [T, K, 6 + C + 2]
        outputs.append(_TileComposite.apply(block[..., :6], block[..., 6:], basis))
        tiles_done.append(tiles)
    acc = torch.zeros(tw * th, P, C + 2, dtype=dt, device=dev)
    if outputs:
        acc = acc.index_copy(0, torch.cat(tiles_done), torch.cat(outputs))
    acc = acc.reshape(th, tw, tile_size, tile_size, C + 2).permute(0, 2, 1, 3, 4)
    acc = acc.reshape(th * tile_size, tw * tile_size, C + 2)[:height, :width]
    rgb, alpha, depth = _finish(acc, height, width, C, background, dt)
    return Rendered(rgb, alpha, depth, _info(proj, width, height))


def rasterize_gsplat(means, quats, scales, opacities, colors, c2w, K, width: int, height: int,
                     background=None, near: float = 0.01, eps2d: float = 0.3) -> Rendered:
    """gsplat's CUDA ``rasterization`` (3DGS kernels; note they clamp alpha at 0.999, not 0.99)."""
    from gsplat import rasterization  # CUDA only: imported here so CPU runs never build the extension

    dt = means.dtype
    C = colors.shape[-1]
    bg = None if background is None else torch.as_tensor(background, dtype=dt, device=means.device).reshape(1, C)
    renders, alphas, info = rasterization(
        means, quats, scales, opacities, colors, _viewmat(c2w).to(dt)[None].to(means.device),
        K.to(dt)[None].to(means.device), width, height, near_plane=near, eps2d=eps2d,
        render_mode="RGB+ED", backgrounds=bg, packed=False)
    radii = info["radii"][0].float()
    radii = radii.max(-1).values if radii.dim() == 2 else radii
    return Rendered(renders[0, ..., :C], alphas[0, ..., 0], renders[0, ..., C],
                    {"means2d": info["means2d"][0], "radii": radii, "width": width, "height": height})


def rasterize(means, quats, scales, opacities, colors, c2w, K, width: int, height: int,
              background=None, backend: str = "auto", **kwargs) -> Rendered:
    """Render ``N`` Gaussians into one camera.

    means ``[N, 3]`` world; quats ``[N, 4]`` (w, x, y, z; any norm); scales ``[N, 3]`` linear;
    opacities ``[N]`` in [0, 1]; colors ``[N, C]``; ``c2w [4, 4]`` OpenCV (``hi3d.cameras``); ``K [3, 3]``
    pixels; background ``[C]`` or None (transparent). Backend ``"auto"`` = gsplat on CUDA, tiles on CPU;
    ``"tiles"``, ``"dense"`` or ``"gsplat"`` force one.
    """
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "tiles"
    fn = {"tiles": rasterize_tiles, "dense": rasterize_dense, "gsplat": rasterize_gsplat}[backend]
    return fn(means, quats, scales, opacities, colors, c2w, K, width, height, background, **kwargs)
