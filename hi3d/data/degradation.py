"""Real-ESRGAN-style second-order degradation of orbit videos (stage-2 training inputs Ĵ), as the release.

Our own batched torch implementation of the release's ``vtdm/degraded_images.py`` (Real-ESRGAN's
``RealESRNetModel`` pipeline with ``configs/train_realesrnet_x4plus.yml``), applied per video to
``[B, F, 3, H, W]`` in [0, 1] at the ground truth's full resolution H×W (the release: 1024²):

1. composite on white through alpha; optional random masking of object regions (shape errors, an hi3d
   addition, ``object_mask_prob``, default 0 = off as the release);
2. round 1 on the full-resolution frames: blur (per-frame kernel: iso/aniso/generalised/plateau Gaussian or
   sinc, sizes 7..21 odd) -> random resize relative to H×W (up/down/keep, area/bilinear/bicubic) ->
   Gaussian or Poisson noise (colour or grey) -> JPEG;
3. round 2: blur with ``second_blur_prob`` -> resize to ``degrade_size``·scale (the release: 256·scale) ->
   noise -> JPEG;
4. final: [resize to ``degrade_size`` (256) + sinc (``final_sinc_prob``)] and JPEG in random order; 8-bit
   rounding; upsampling to the target size with a random mode (``output_resize_mode=random``); the
   background re-whitened where the ground truth's alpha is 0 (no alpha: where the ground truth is exactly
   white); frame 0 replaced by the clean frame (``keep_first_frame``).

Drawn once per video (the release degrades one video per call): resize scales and modes, noise type
(Gaussian or Poisson) of each round, whether the second blur happens, the order of the final step, the
upsampling mode. Drawn per frame: kernels, noise level and greyness, JPEG quality (basicsr draws those per
image). Every draw comes from the ``torch.Generator`` passed in. JPEG is a batched torch simulation (YCbCr,
4:2:0 chroma, 8×8 orthonormal DCT, libjpeg's quality-scaled tables, rounding); ``jpeg_pil`` is the
reference it is tested against.
"""

from __future__ import annotations

import argparse
import dataclasses
import io as _io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclasses.dataclass
class DegradationConfig:
    """Probabilities and ranges; names and defaults are Real-ESRGAN's (``train_realesrnet_x4plus.yml``)."""

    degrade_size: int = 256
    """Low-resolution side: round 2 resizes to ``degrade_size``·scale, the final step to ``degrade_size``
    (the release: 1024 / scale 4 = 256)."""
    keep_first_frame: bool = True
    """Frame 0 is the input view: left clean (only resized)."""
    output_resize_mode: str = "random"
    """Upsampling of the low-resolution result to the target: random (area | bilinear | bicubic per video,
    the release) or one of those."""
    # kernels (sizes are the odd numbers in [kernel_size_min, blur_kernel_size])
    blur_kernel_size: int = 21
    kernel_size_min: int = 7
    kernel_list: list[str] = dataclasses.field(default_factory=lambda: list(KERNEL_TYPES))
    kernel_prob: list[float] = dataclasses.field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob: float = 0.1
    blur_sigma: list[float] = dataclasses.field(default_factory=lambda: [0.2, 3.0])
    betag_range: list[float] = dataclasses.field(default_factory=lambda: [0.5, 4.0])
    betap_range: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0])
    kernel_list2: list[str] = dataclasses.field(default_factory=lambda: list(KERNEL_TYPES))
    kernel_prob2: list[float] = dataclasses.field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob2: float = 0.1
    blur_sigma2: list[float] = dataclasses.field(default_factory=lambda: [0.2, 1.5])
    betag_range2: list[float] = dataclasses.field(default_factory=lambda: [0.5, 4.0])
    betap_range2: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0])
    final_sinc_prob: float = 0.8
    # first degradation round
    resize_prob: list[float] = dataclasses.field(default_factory=lambda: [0.2, 0.7, 0.1])  # up, down, keep
    resize_range: list[float] = dataclasses.field(default_factory=lambda: [0.15, 1.5])
    gaussian_noise_prob: float = 0.5
    noise_range: list[float] = dataclasses.field(default_factory=lambda: [1.0, 30.0])
    poisson_scale_range: list[float] = dataclasses.field(default_factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = 0.4
    jpeg_range: list[float] = dataclasses.field(default_factory=lambda: [30.0, 95.0])
    # second degradation round
    second_blur_prob: float = 0.8
    resize_prob2: list[float] = dataclasses.field(default_factory=lambda: [0.3, 0.4, 0.3])
    resize_range2: list[float] = dataclasses.field(default_factory=lambda: [0.3, 1.2])
    gaussian_noise_prob2: float = 0.5
    noise_range2: list[float] = dataclasses.field(default_factory=lambda: [1.0, 25.0])
    poisson_scale_range2: list[float] = dataclasses.field(default_factory=lambda: [0.05, 2.5])
    gray_noise_prob2: float = 0.4
    jpeg_range2: list[float] = dataclasses.field(default_factory=lambda: [30.0, 95.0])
    # masking of object regions (shape errors); an hi3d addition (not in the release), the paper gives no numbers
    object_mask_prob: float = 0.0
    """Probability per frame of masking blobs of the object (0: off, as the release; hi3d used 0.3)."""
    mask_blobs: list[int] = dataclasses.field(default_factory=lambda: [1, 3])
    mask_radius: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.35])
    """Blob semi-axes as fractions of the object's size (square root of its mask area)."""
    mask_white_prob: float = 0.5
    """Probability that a masked frame's blobs are filled white (else with the local mean object colour)."""


# ----------------------------------------------------------------------------------------------- randomness
def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=g.device, dtype=torch.float64).cpu()


def _uniform(g: torch.Generator, n: int, lo_hi) -> torch.Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + (hi - lo) * _rand(g, n)


def _choice(g: torch.Generator, n: int, probs) -> torch.Tensor:
    """``n`` indices drawn with the given probabilities (int64 ``[n]``)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    edges = torch.cumsum(p / p.sum(), 0)
    return torch.searchsorted(edges, _rand(g, n), right=True).clamp(max=len(p) - 1)


# ------------------------------------------------------------------------------------------------- kernels
def mesh_grid(kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel offsets ``xx, yy`` ``[k, k]`` (float64) centred on the kernel's middle pixel (k odd)."""
    ax = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def sigma_matrix(sig_x: torch.Tensor, sig_y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Covariances ``[N, 2, 2]`` = R(θ) diag(σx², σy²) R(θ)ᵀ."""
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    d = torch.diag_embed(torch.stack([sig_x**2, sig_y**2], -1))
    return rot @ d @ rot.transpose(-1, -2)


def _mahalanobis(kernel_size: int, sig_x, sig_y, theta) -> torch.Tensor:
    """``xᵀ Σ⁻¹ x`` on the kernel grid, ``[N, k, k]``."""
    xx, yy = mesh_grid(kernel_size)
    grid = torch.stack([xx, yy], -1).reshape(-1, 2)  # [k*k, 2]
    as64 = lambda t: torch.as_tensor(t, dtype=torch.float64).reshape(-1)  # noqa: E731
    inv = torch.linalg.inv(sigma_matrix(as64(sig_x), as64(sig_y), as64(theta)))  # [N, 2, 2]
    q = torch.einsum("pi,nij,pj->np", grid, inv, grid)
    return q.reshape(-1, kernel_size, kernel_size)


def _normalise(k: torch.Tensor) -> torch.Tensor:
    return k / k.sum(dim=(-1, -2), keepdim=True)


def bivariate_gaussian(kernel_size: int, sig_x, sig_y, theta) -> torch.Tensor:
    """``exp(-½ xᵀΣ⁻¹x)``, normalised to sum 1. ``[N, k, k]`` float64."""
    return _normalise(torch.exp(-0.5 * _mahalanobis(kernel_size, sig_x, sig_y, theta)))


def bivariate_generalized_gaussian(kernel_size: int, sig_x, sig_y, theta, beta) -> torch.Tensor:
    """``exp(-½ (xᵀΣ⁻¹x)^β)``, normalised. ``[N, k, k]``."""
    q = _mahalanobis(kernel_size, sig_x, sig_y, theta)
    return _normalise(torch.exp(-0.5 * q ** torch.as_tensor(beta, dtype=q.dtype).view(-1, 1, 1)))


def bivariate_plateau(kernel_size: int, sig_x, sig_y, theta, beta) -> torch.Tensor:
    """``1 / ((xᵀΣ⁻¹x)^β + 1)``, normalised. ``[N, k, k]``."""
    q = _mahalanobis(kernel_size, sig_x, sig_y, theta)
    return _normalise(1.0 / (q ** torch.as_tensor(beta, dtype=q.dtype).view(-1, 1, 1) + 1.0))


def circular_lowpass_kernel(cutoff: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """2-D sinc (ideal circular low-pass) ``ω J1(ω r) / (2π r)``, centre ``ω²/(4π)``, normalised. ``[N, k, k]``."""
    cutoff = torch.as_tensor(cutoff, dtype=torch.float64).view(-1, 1, 1)
    xx, yy = mesh_grid(kernel_size)
    r = torch.sqrt(xx**2 + yy**2)
    r_safe = torch.where(r == 0, torch.ones_like(r), r)
    k = cutoff * torch.special.bessel_j1(cutoff * r_safe) / (2 * math.pi * r_safe)
    k = torch.where(r == 0, cutoff**2 / (4 * math.pi), k)
    return _normalise(k)


def _size_window(sizes: torch.Tensor, full: int) -> torch.Tensor:
    """``[N, full, full]`` 1 inside each centred ``sizes[i]`` square (padding a smaller kernel to ``full``)."""
    xx, yy = mesh_grid(full)
    half = (sizes.to(torch.float64).view(-1, 1, 1) - 1) / 2
    return ((xx.abs() <= half) & (yy.abs() <= half)).to(torch.float64)


def random_kernels(g: torch.Generator, n: int, kernel_list, kernel_prob, sinc_prob: float, blur_sigma,
                   betag_range, betap_range, kernel_size: int = 21, kernel_size_min: int = 7) -> torch.Tensor:
    """Real-ESRGAN's first/second-round blur kernels, ``[n, kernel_size, kernel_size]`` float64, each summing to 1.

    Per kernel: size uniform over the odd numbers in [kernel_size_min, kernel_size]; with ``sinc_prob`` a sinc
    with ω ~ U(π/3, π) (U(π/5, π) for sizes ≥ 13); else a type from ``kernel_list`` with ``kernel_prob``:
    σx, σy ~ U(blur_sigma) (σy = σx and θ = 0 for *_iso), θ ~ U(-π, π), β half the time below 1.
    """
    sizes = torch.tensor(range(kernel_size_min, kernel_size + 1, 2))[_choice(g, n, [1.0] * len(
        range(kernel_size_min, kernel_size + 1, 2)))]
    kind = torch.tensor([KERNEL_TYPES.index(k) for k in kernel_list])[_choice(g, n, kernel_prob)]
    iso = torch.tensor([k.endswith("iso") and not k.endswith("aniso") for k in KERNEL_TYPES])[kind]
    sig_x, sig_y = _uniform(g, n, blur_sigma), _uniform(g, n, blur_sigma)
    theta = _uniform(g, n, [-math.pi, math.pi])
    sig_y, theta = torch.where(iso, sig_x, sig_y), torch.where(iso, torch.zeros_like(theta), theta)

    def beta(rng):
        low = _rand(g, n) < 0.5
        return torch.where(low, _uniform(g, n, [rng[0], 1.0]), _uniform(g, n, [1.0, rng[1]]))

    beta_g, beta_p = beta(betag_range), beta(betap_range)
    use_sinc = _rand(g, n) < sinc_prob
    omega = torch.where(sizes < 13, _uniform(g, n, [math.pi / 3, math.pi]), _uniform(g, n, [math.pi / 5, math.pi]))

    family = kind // 2  # 0 gaussian, 1 generalised, 2 plateau
    k = torch.where((family == 0).view(-1, 1, 1), bivariate_gaussian(kernel_size, sig_x, sig_y, theta),
                    torch.where((family == 1).view(-1, 1, 1),
                                bivariate_generalized_gaussian(kernel_size, sig_x, sig_y, theta, beta_g),
                                bivariate_plateau(kernel_size, sig_x, sig_y, theta, beta_p)))
    k = torch.where(use_sinc.view(-1, 1, 1), circular_lowpass_kernel(omega, kernel_size), k)
    return _normalise(k * _size_window(sizes, kernel_size))


def random_final_sinc(g: torch.Generator, n: int, prob: float, kernel_size: int = 21,
                      kernel_size_min: int = 7) -> torch.Tensor:
    """Final sinc kernels (ω ~ U(π/3, π), random size) with probability ``prob``, else the identity. ``[n, k, k]``."""
    choices = list(range(kernel_size_min, kernel_size + 1, 2))
    sizes = torch.tensor(choices)[_choice(g, n, [1.0] * len(choices))]
    omega = _uniform(g, n, [math.pi / 3, math.pi])
    use = _rand(g, n) < prob
    sinc = _normalise(circular_lowpass_kernel(omega, kernel_size) * _size_window(sizes, kernel_size))
    pulse = torch.zeros(n, kernel_size, kernel_size, dtype=torch.float64)
    pulse[:, kernel_size // 2, kernel_size // 2] = 1
    return torch.where(use.view(-1, 1, 1), sinc, pulse)


def filter2d(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image ``x [N, C, H, W]`` with its own kernel ``[N, k, k]`` (reflect padding)."""
    n, c, h, w = x.shape
    k = kernels.shape[-1]
    pad = k // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode).reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    weight = kernels.to(x).repeat_interleave(c, 0).unsqueeze(1)  # [N*C, 1, k, k]
    return F.conv2d(xp, weight.flip(-1, -2), groups=n * c).reshape(n, c, h, w)


# --------------------------------------------------------------------------------------------------- noise
def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def gaussian_noise(x: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise (σ in [0, 1] units per image ``[N]``; grey images: one noise for all channels)."""
    noise = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype).to(x.device)
    noise = torch.where(gray.view(-1, 1, 1, 1).to(x.device), noise[:, :1].expand_as(noise), noise)
    return noise * sigma.view(-1, 1, 1, 1).to(x)


def poisson_noise(x: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Poisson (shot) noise as Real-ESRGAN: on 8-bit values, with 2^⌈log2(#levels)⌉ photon levels, times ``scale``."""
    gray = gray.view(-1, 1, 1, 1).to(x.device)
    src = torch.where(gray, _gray(x).expand_as(x), x)
    src = torch.clamp((src * 255).round(), 0, 255) / 255
    codes = (src * 255).round().long().reshape(len(src), -1)
    present = torch.zeros(len(src), 256, device=x.device).scatter_(1, codes, 1.0)
    vals = torch.exp2(torch.ceil(torch.log2(present.sum(1).clamp(min=1)))).to(x.dtype).view(-1, 1, 1, 1)
    lam = (src * vals).to(g.device)
    out = torch.poisson(lam, generator=g).to(x.device) / vals
    noise = out - src
    noise = torch.where(gray, noise[:, :1].expand_as(noise), noise)
    return noise * scale.view(-1, 1, 1, 1).to(x)


def random_noise(x: torch.Tensor, g: torch.Generator, gaussian: bool, noise_range, poisson_scale_range,
                 gray_prob: float) -> torch.Tensor:
    """Gaussian noise (σ ~ U(noise_range)/255 per image) if ``gaussian`` (one draw per video, by the caller),
    else Poisson (scale ~ U(poisson_scale_range) per image); grey per image with ``gray_prob``. Returns
    ``x + noise`` clamped to [0, 1]."""
    n = x.shape[0]
    gray = _rand(g, n) < gray_prob
    if gaussian:
        noise = gaussian_noise(x, _uniform(g, n, noise_range) / 255.0, gray, g)
    else:
        noise = poisson_noise(x, _uniform(g, n, poisson_scale_range), gray, g)
    return (x + noise).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------- JPEG
_Y_TABLE = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
_C_TABLE = torch.full((8, 8), 99.0)
_C_TABLE[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])


def quality_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg's quality scaling: s = 5000/q (q < 50) or 200 - 2q; table = clamp(⌊(T·s + 50)/100⌋, 1, 255).
    ``quality [N]`` (rounded to integers) -> luma, chroma tables ``[N, 8, 8]``."""
    q = quality.round().clamp(1, 100).to(torch.float32).view(-1, 1, 1)
    s = torch.where(q < 50, 5000.0 / q, 200.0 - 2 * q)
    tab = lambda t: torch.floor((t * s + 50) / 100).clamp(1, 255)  # noqa: E731
    return tab(_Y_TABLE), tab(_C_TABLE)


def _dct_matrix(device, dtype) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix (JPEG's 2-D DCT is D X Dᵀ)."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.to(device, dtype)


def _quantise_channel(c: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Level-shifted channel ``[N, H, W]`` (H, W multiples of 8) through blockwise DCT, quantisation, IDCT.
    The 8×8 DCT is a stride-8 convolution with the 64 basis images ``d_u ⊗ d_v`` (and its transpose)."""
    n = c.shape[0]
    d = _dct_matrix(c.device, c.dtype)
    basis = (d[:, None, :, None] * d[None, :, None, :]).reshape(64, 1, 8, 8)
    coef = F.conv2d(c[:, None], basis, stride=8)  # [N, 64, H/8, W/8]
    t = table.to(c).reshape(n, 64, 1, 1)
    return F.conv_transpose2d(torch.round(coef / t) * t, basis, stride=8)[:, 0]


def jpeg_compress(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Batched JPEG simulation of ``x [N, 3, H, W]`` in [0, 1] at per-image ``quality [N]`` (4:2:0 chroma).

    Not bit-exact with libjpeg (chroma upsampling is bilinear, not libjpeg's "fancy" filter); matches
    ``jpeg_pil`` closely (tested)."""
    n, _, h, w = x.shape
    ph, pw = (-h) % 16, (-w) % 16
    v = F.pad(x.clamp(0, 1) * 255, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x.clamp(0, 1) * 255
    r, gch, b = v[:, 0], v[:, 1], v[:, 2]
    y = 0.299 * r + 0.587 * gch + 0.114 * b
    cb = -0.168736 * r - 0.331264 * gch + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * gch - 0.081312 * b + 128
    ty, tc = quality_tables(quality.cpu())
    y = _quantise_channel(y - 128, ty) + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)  # [N, 2, H/2, W/2]
    chroma = _quantise_channel(chroma.flatten(0, 1) - 128, tc.repeat_interleave(2, 0)).view_as(chroma) + 128
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = chroma[:, 0] - 128, chroma[:, 1] - 128
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    rgb = torch.round(rgb).clamp(0, 255) / 255
    return rgb[:, :, :h, :w]


def jpeg_pil(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Reference: round-trip each image of ``x [N, 3, H, W]`` through PIL's libjpeg (4:2:0) at ``quality``."""
    from PIL import Image

    out = []
    for im, q in zip(x, quality):
        a = (im.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        buf = _io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=int(round(float(q))), subsampling=2)
        buf.seek(0)
        with Image.open(buf) as dec:
            out.append(torch.from_numpy(np.asarray(dec.convert("RGB")).astype(np.float32) / 255).permute(2, 0, 1))
    return torch.stack(out).to(x)


# ------------------------------------------------------------------------------------------------- masking
def object_mask_from_white(x: torch.Tensor, threshold: float = 0.02) -> torch.Tensor:
    """``[N, 1, H, W]`` bool: pixels of ``x [N, 3, H, W]`` (on white) darker than white by more than ``threshold``."""
    return (1 - x.min(dim=1, keepdim=True).values) > threshold


def random_object_masking(x: torch.Tensor, mask: torch.Tensor, g: torch.Generator, prob: float, blobs,
                          radius, white_prob: float, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Mimic shape errors: per image with ``prob``, ``U{blobs}`` elliptic blobs centred on object pixels
    (semi-axes ``U(radius)`` × √area, random angle), intersected with ``mask``, filled white (with
    ``white_prob``) or with the local mean colour of the rest of the object. Only pixels inside ``mask``
    change. ``x [N, 3, H, W]`` in [0, 1], ``mask [N, 1, H, W]`` bool, ``skip [N]`` bool images to leave alone."""
    n, _, h, w = x.shape
    nb = int(blobs[1])
    active = _rand(g, n) < prob
    if skip is not None:
        active &= ~skip.cpu()
    count = torch.randint(int(blobs[0]), nb + 1, (n,), generator=g, device=g.device).cpu()
    flat = mask.reshape(n, -1).to(torch.float64).cpu()
    area = flat.sum(1)
    active &= area > 0
    weights = torch.where(area[:, None] > 0, flat, torch.ones_like(flat))
    centre = torch.multinomial(weights.to(g.device), nb, replacement=True, generator=g).cpu()  # [n, nb]
    cy, cx = (centre // w).to(torch.float64) + 0.5, (centre % w).to(torch.float64) + 0.5
    size = area.sqrt().view(-1, 1)
    ra, rb = _uniform(g, n * nb, radius).view(n, nb) * size, _uniform(g, n * nb, radius).view(n, nb) * size
    ang = _uniform(g, n * nb, [0, math.pi]).view(n, nb)
    white = _rand(g, n) < white_prob
    ys = torch.arange(h, dtype=torch.float64).view(1, 1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float64).view(1, 1, 1, w) + 0.5
    dy, dx = ys - cy[..., None, None], xs - cx[..., None, None]
    c, s = torch.cos(ang)[..., None, None], torch.sin(ang)[..., None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy
    inside = (u / ra[..., None, None].clamp(min=1e-6)) ** 2 + (v / rb[..., None, None].clamp(min=1e-6)) ** 2 <= 1
    inside &= (torch.arange(nb).view(1, nb, 1, 1) < count.view(n, 1, 1, 1))
    blob = inside.any(1, keepdim=True).to(x.device) & mask & active.view(n, 1, 1, 1).to(x.device)
    keep = (mask & ~blob).to(x.dtype)
    low = (max(1, h // 16), max(1, w // 16))  # local mean over ~1/16 of the image, by area-down + bilinear-up
    num, den = F.interpolate(x * keep, size=low, mode="area"), F.interpolate(keep, size=low, mode="area")
    local = torch.where(den > 1e-3, num / den.clamp(min=1e-3), torch.ones_like(num))
    local = F.interpolate(local, size=(h, w), mode="bilinear", align_corners=False)
    fill = torch.where(white.view(n, 1, 1, 1).to(x.device), torch.ones_like(x), local)
    return torch.where(blob, fill, x)


# ---------------------------------------------------------------------------------------------- the pipeline
def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False).clamp(0, 1)


def _resize_clean(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Quality resize (antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True).clamp(0, 1)


def _random_resize_scale(g: torch.Generator, probs, rng) -> float:
    kind = int(_choice(g, 1, probs)[0])
    lo = _uniform(g, 1, [1.0, rng[1]])[0] if kind == 0 else _uniform(g, 1, [rng[0], 1.0])[0]
    return float(lo) if kind < 2 else 1.0


def _round(x: torch.Tensor, g: torch.Generator, cfg: DegradationConfig, second: bool, trace: dict) -> torch.Tensor:
    """One degradation round on one video's frames ``x [F, 3, h, w]``: round 1 resizes relative to the
    frames' size, round 2 relative to ``degrade_size``."""
    n = x.shape[0]
    sfx = "2" if second else ""
    kernels = random_kernels(g, n, getattr(cfg, "kernel_list" + sfx), getattr(cfg, "kernel_prob" + sfx),
                             getattr(cfg, "sinc_prob" + sfx), getattr(cfg, "blur_sigma" + sfx),
                             getattr(cfg, "betag_range" + sfx), getattr(cfg, "betap_range" + sfx),
                             cfg.blur_kernel_size, cfg.kernel_size_min)
    blur = not second or bool(_rand(g, 1)[0] < cfg.second_blur_prob)  # the second blur: once per video
    if blur:
        x = filter2d(x, kernels)
    scale = _random_resize_scale(g, getattr(cfg, "resize_prob" + sfx), getattr(cfg, "resize_range" + sfx))
    mode = RESIZE_MODES[int(_choice(g, 1, [1, 1, 1])[0])]
    ref = (cfg.degrade_size, cfg.degrade_size) if second else x.shape[-2:]
    x = _resize(x, (int(ref[0] * scale), int(ref[1] * scale)), mode)
    gaussian = bool(_rand(g, 1)[0] < getattr(cfg, "gaussian_noise_prob" + sfx))  # noise type: once per video
    x = random_noise(x, g, gaussian, getattr(cfg, "noise_range" + sfx), getattr(cfg, "poisson_scale_range" + sfx),
                     getattr(cfg, "gray_noise_prob" + sfx))
    trace[f"round{2 if second else 1}"] = {"blur": blur, "scale": scale, "mode": mode, "size": tuple(x.shape[-2:]),
                                          "noise": "gaussian" if gaussian else "poisson"}
    return jpeg_compress(x, _uniform(g, n, getattr(cfg, "jpeg_range" + sfx)))


def _degrade_one(x: torch.Tensor, cfg: DegradationConfig, g: torch.Generator, out_size: tuple[int, int],
                 trace: dict) -> torch.Tensor:
    """One video ``x [F, 3, H, W]`` on white, full resolution -> degraded ``[F, 3, *out_size]`` (not re-whitened)."""
    trace["input"] = tuple(x.shape[-2:])
    x = _round(x, g, cfg, second=False, trace=trace)
    x = _round(x, g, cfg, second=True, trace=trace)
    n, s = x.shape[0], (cfg.degrade_size, cfg.degrade_size)
    sinc = random_final_sinc(g, n, cfg.final_sinc_prob, cfg.blur_kernel_size, cfg.kernel_size_min)
    mode = RESIZE_MODES[int(_choice(g, 1, [1, 1, 1])[0])]
    sinc_first = bool(_rand(g, 1)[0] < 0.5)
    quality = _uniform(g, n, cfg.jpeg_range2)
    if sinc_first:
        x = jpeg_compress(filter2d(_resize(x, s, mode), sinc).clamp(0, 1), quality)
    else:
        x = filter2d(_resize(jpeg_compress(x, quality), s, mode), sinc)
    x = (x.clamp(0, 1) * 255).round() / 255
    up = RESIZE_MODES[int(_choice(g, 1, [1, 1, 1])[0])] if cfg.output_resize_mode == "random" else cfg.output_resize_mode
    trace["final"] = {"mode": mode, "sinc_first": sinc_first, "size": tuple(x.shape[-2:])}
    trace["output"] = {"mode": up, "size": tuple(out_size)}
    return _resize(x, out_size, up)


@torch.no_grad()
def degrade_video(frames: torch.Tensor, cfg: DegradationConfig, generator: torch.Generator,
                  alpha: torch.Tensor | None = None, out_size: tuple[int, int] | None = None,
                  trace: list | None = None) -> torch.Tensor:
    """Degrade videos ``frames [B, F, 3, H, W]`` in [0, 1] (straight RGB if ``alpha [B, F, 1, H, W]`` is given,
    else already on white) at their full resolution. Returns ``[B, F, 3, *out_size]`` in [0, 1] (default: the
    input size), on white: exactly 1 where alpha is 0 (without alpha: where the input is exactly white).
    ``trace``: a list that gets one dict per video with its per-video draws and the size after each step.

    The object mask for ``object_mask_prob`` is ``alpha > 0.5``, or, without alpha, the non-white pixels.
    """
    if cfg.output_resize_mode not in ("random", *RESIZE_MODES):
        raise ValueError(f"output_resize_mode='{cfg.output_resize_mode}' is not one of random, {', '.join(RESIZE_MODES)}")
    b, f, _, h, w = frames.shape
    out_size = tuple(out_size or (h, w))
    x = frames.float()
    if alpha is not None:
        a = alpha.float()
        x = x * a + (1 - a)
        background = a[:, :, 0] == 0  # [B, F, H, W]
    else:
        background = (x == 1).all(2)
    if out_size != (h, w):
        background = F.interpolate(background.float(), size=out_size, mode="nearest") > 0.5
    clean = x
    out = []
    for i in range(b):
        v = x[i]
        if cfg.object_mask_prob > 0:
            mask = alpha[i].float() > 0.5 if alpha is not None else object_mask_from_white(v)
            skip = torch.zeros(f, dtype=torch.bool)
            skip[0] = cfg.keep_first_frame
            v = random_object_masking(v, mask, generator, cfg.object_mask_prob, cfg.mask_blobs, cfg.mask_radius,
                                      cfg.mask_white_prob, skip=skip)
        record: dict = {}
        out.append(_degrade_one(v, cfg, generator, out_size, record))
        if trace is not None:
            trace.append(record)
    x = torch.stack(out).clamp(0, 1)
    x = torch.where(background[:, :, None], torch.ones_like(x), x)  # re-whitened with the ground truth's alpha
    if cfg.keep_first_frame:
        x[:, 0] = _resize_clean(clean[:, 0], out_size)
    return x


# ------------------------------------------------------------------------------------------------------ CLI
def cli(argv: list[str]) -> int:
    """``hi3d degrade ORBIT_DIR --out DIR --seed S [--size N] [--config YAML] [key=value ...]``."""
    from hi3d.cli import add_config_args
    from hi3d.config import load_config
    from hi3d.data.orbit import load_orbit, save_orbit
    from hi3d.io import contact_sheet, save_png
    from hi3d.provenance import RunRecord

    p = argparse.ArgumentParser(prog="hi3d degrade", description="Write Real-ESRGAN-style degraded frames of an "
                                "orbit (stage-2 training inputs) as an orbit folder, with a clean|degraded sheet.")
    p.add_argument("orbit_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="output size (default: the orbit's)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = auto: the free cores, hi3d.threads)")
    add_config_args(p)
    args = p.parse_intermixed_args(argv)
    cfg = load_config(DegradationConfig, args.config, args.overrides)
    orbit = load_orbit(args.orbit_dir, load_depth=False)
    rec = RunRecord(args.out, "degrade", config=cfg, seed=args.seed)
    from hi3d.threads import cpu_threads

    with rec.stage("degrade") as entry, cpu_threads(args.threads) as threads:
        entry["threads"] = threads.threads
        size = (args.size, args.size) if args.size else (orbit.height, orbit.width)
        rgba = orbit.rgba.permute(0, 3, 1, 2)[None]  # [1, N, 4, H, W]
        g = torch.Generator().manual_seed(args.seed)
        out = degrade_video(rgba[:, :, :3], cfg, g, alpha=rgba[:, :, 3:], out_size=size)[0].permute(0, 2, 3, 1)
        entry["frames"] = len(orbit)
    degraded = dataclasses.replace(orbit, rgba=torch.cat([out, torch.ones_like(out[..., :1])], -1),
                                   source=["degraded"] * len(orbit))
    if size != (orbit.height, orbit.width):
        degraded.K = orbit.K.clone()
        degraded.K[:, 0] *= size[1] / orbit.width
        degraded.K[:, 1] *= size[0] / orbit.height
    save_orbit(degraded, args.out, extra={"degradation": {"seed": args.seed, "source": str(args.orbit_dir)}})
    clean = _resize_clean(orbit.rgb_on_white().permute(0, 3, 1, 2), size).permute(0, 2, 3, 1)
    save_png(args.out / "clean_vs_degraded.png", contact_sheet(list(clean) + list(out), cols=len(orbit)))
    rec.finish()
    print(f"wrote {len(orbit)} degraded frames to {args.out}")
    return 0
