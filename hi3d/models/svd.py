"""Stable Video Diffusion component helpers shared by stage 1 and stage 2: CLIP image embedding, VAE
encode/decode of videos, the conditioned UNet call, and deterministic init of random components.

Pixel tensors are float in [-1, 1]; videos ``[B, F, 3, H, W]``; latents ``[B, F, 4, H/8, W/8]``
(the VAE's downsampling factor, 8 for SVD).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

PIPELINE_FILE = "hi3d_pipeline.json"  # in a saved stage folder: the stage config, incl. the slot layout


def module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Normal noise drawn on the generator's device (CPU generators work for GPU tensors), then moved."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(device, dtype)


def gaussian_blur(x: torch.Tensor, kernel: tuple[int, int], sigma: tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur of ``x [N, C, H, W]`` (odd kernel sizes, taps exp(−n²/2σ²) normalised to 1,
    reflect padding)."""
    N, C, H, W = x.shape
    y = x.reshape(N * C, 1, H, W)
    for axis, (k, s) in enumerate(zip(kernel, sigma)):
        if k == 1:
            continue
        n = torch.arange(k, dtype=torch.float32, device=x.device) - k // 2
        taps = torch.exp(-n ** 2 / (2 * s ** 2))
        taps = (taps / taps.sum()).to(x.dtype)
        shape, pad = ((1, 1, k, 1), (0, 0, k // 2, k // 2)) if axis == 0 else ((1, 1, 1, k), (k // 2, k // 2, 0, 0))
        y = F.conv2d(F.pad(y, pad, mode="reflect"), taps.view(shape))
    return y.reshape(N, C, H, W)


def clip_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """sgm's CLIP resize, kornia's ``resize(x, size, "bicubic", align_corners=True, antialias=True)``: when
    shrinking, a Gaussian blur first (σ = max((factor − 1)/2, 0.001) per axis, kernel int(max(4σ, 3)) made odd),
    then bicubic interpolation with aligned corners. ``x [N, C, H, W]``; not clamped."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    factors = (h / size[0], w / size[1])
    if max(factors) > 1:
        sigma = tuple(max((f - 1.0) / 2.0, 0.001) for f in factors)
        kernel = tuple(1 if n == 1 else (k if k % 2 else k + 1)
                       for n, k in zip((h, w), (int(max(4.0 * s, 3)) for s in sigma)))
        x = gaussian_blur(x, kernel, sigma)
    return F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=True)


def clip_embed(image_encoder, feature_extractor, image: torch.Tensor) -> torch.Tensor:
    """CLIP image embedding for cross-attention: ``image [B, 3, H, W]`` in [-1, 1] -> ``[B, 1, D]``.

    As SVD and the Hi3D release (sgm ``FrozenOpenCLIPImageEmbedder``): kornia's antialiased bicubic resize to
    the encoder's input size (``clip_resize``), [-1, 1] -> [0, 1] without clamping, CLIP mean/std
    normalisation (from ``feature_extractor``), no crop.
    """
    device, dtype = module_device_dtype(image_encoder)
    size = image_encoder.config.image_size
    x = clip_resize(image.to(device, torch.float32), (size, size))
    x = (x + 1.0) / 2.0
    mean = torch.tensor(feature_extractor.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(feature_extractor.image_std, device=device).view(1, 3, 1, 1)
    x = ((x - mean) / std).to(dtype)
    return image_encoder(pixel_values=x).image_embeds.unsqueeze(1)


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_frames(vae, frames: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True,
                  chunk: int = 16) -> torch.Tensor:
    """Video ``[B, F, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, F, 4, h, w]`` (× ``scaling_factor``).
    ``sample``: draw from the posterior with ``generator`` (training, as sgm); else its mode."""
    device, dtype = module_device_dtype(vae)
    B, Fr = frames.shape[:2]
    x = frames.flatten(0, 1).to(device, dtype)
    out = []
    for i in range(0, x.shape[0], chunk):
        dist = vae.encode(x[i:i + chunk]).latent_dist
        out.append(dist.mean + dist.std * randn(dist.mean.shape, generator, device, dist.mean.dtype)
                   if sample else dist.mode())
    z = torch.cat(out) * vae.config.scaling_factor
    return z.unflatten(0, (B, Fr))


def encode_condition(vae, image: torch.Tensor) -> torch.Tensor:
    """Conditioning latent of the (noise-augmented) input ``[B, 3, H, W]`` -> ``[B, 4, h, w]``: the posterior
    mode, NOT multiplied by ``scaling_factor`` (as SVD: sgm ``VideoPredictionEmbedderWithEncoder`` and
    diffusers' pipeline both concatenate the unscaled latent)."""
    device, dtype = module_device_dtype(vae)
    return vae.encode(image.to(device, dtype)).latent_dist.mode()


def decode_latents(vae, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Scaled latents ``[B, F, 4, h, w]`` -> video ``[B, F, 3, H, W]`` float32 in [-1, 1] (unclamped).
    Decodes ``chunk`` frames of one video at a time (the temporal decoder mixes frames within a chunk)."""
    device, dtype = module_device_dtype(vae)
    takes_frames = "num_frames" in inspect.signature(vae.decode).parameters
    videos = []
    for video in latents:
        parts = []
        for i in range(0, video.shape[0], chunk):
            z = (video[i:i + chunk] / vae.config.scaling_factor).to(device, dtype)
            kw = {"num_frames": z.shape[0]} if takes_frames else {}
            parts.append(vae.decode(z, **kw).sample.float())
        videos.append(torch.cat(parts))
    return torch.stack(videos)


def unet_forward(unet, x: torch.Tensor, c_noise: torch.Tensor, concat: torch.Tensor, clip: torch.Tensor,
                 time_ids: torch.Tensor) -> torch.Tensor:
    """Raw UNet F: ``x [B, F, 4, h, w]`` (already × c_in) with ``concat [B, F, C, h, w]`` appended on the
    channel axis, timestep ``c_noise [B]``, cross-attention ``clip [B, 1, D]``, ``time_ids [B, S]``."""
    p = next(unet.parameters())
    inp = torch.cat([x, concat.to(x)], dim=2).to(p.dtype)
    out = unet(inp, c_noise.to(p.device, torch.float32), encoder_hidden_states=clip.to(p.dtype),
               added_time_ids=time_ids.to(p.device, p.dtype), return_dict=False)[0]
    return out.to(x.dtype)


@torch.no_grad()
def init_weights_(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Deterministic random init from ``generator`` (no global RNG): matrices/kernels ~ U(±1/√fan_in),
    biases 0, other free vectors (e.g. CLIP class embedding) ~ N(0, 0.02²); norm weights and fixed
    parameters (e.g. ``mix_factor``) keep their constructor values."""
    for name, p in sorted(module.named_parameters()):
        if p.ndim >= 2:
            bound = 1.0 / math.sqrt(p[0].numel())
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
        elif name.endswith("bias"):
            p.zero_()
        elif "norm" not in name and not name.endswith(("mix_factor", "weight")):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return module


def prepare_for_training(unet: torch.nn.Module, gradient_checkpointing: bool, trainable_params: list[str]) -> None:
    """Turn on gradient checkpointing; train only parameters whose names contain one of ``trainable_params``
    (all when empty)."""
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if trainable_params:
        for name, p in unet.named_parameters():
            p.requires_grad_(any(k in name for k in trainable_params))


def save_stage_folder(folder: str | Path, components: Mapping[str, object], config) -> None:
    """Write a stage folder: ``<name>/`` per component (its ``save_pretrained``; ``None`` skipped; a DDP-wrapped
    module unwrapped) + ``hi3d_pipeline.json`` (``config``, a stage config dataclass, with ``pretrained``
    folders cleared and ``tiny`` off). Written to a temporary folder, then swapped in whole."""
    from hi3d.config import to_dict
    from hi3d.io import atomic_folder, write_json

    with atomic_folder(folder) as tmp:
        for name, module in components.items():
            if module is not None:
                getattr(module, "module", module).save_pretrained(tmp / name)
        cfg = to_dict(config)
        cfg["pretrained"] = None
        cfg["tiny"]["enabled"] = False
        for value in cfg.values():  # nested component configs (e.g. depth) point at the saved subfolder
            if isinstance(value, dict) and "pretrained" in value:
                value["pretrained"] = None
        write_json(tmp / PIPELINE_FILE, cfg)


SGM_RESNET_NORM_EPS = 1e-5


def match_sgm_norm_eps(unet: torch.nn.Module) -> int:
    """Set the GroupNorm eps of every resnet (spatial and temporal) of a diffusers
    ``UNetSpatioTemporalConditionModel`` to sgm's 1e-5 (sgm's ``ResBlock`` uses ``GroupNorm32`` with torch's
    default eps; diffusers builds most of them with 1e-6). Attention norms keep 1e-6, as sgm's. In place;
    returns how many norms were changed."""
    from diffusers.models.resnet import ResnetBlock2D, TemporalResnetBlock

    changed = 0
    for m in unet.modules():
        if isinstance(m, (ResnetBlock2D, TemporalResnetBlock)):
            for norm in (m.norm1, m.norm2):
                changed += norm.eps != SGM_RESNET_NORM_EPS
                norm.eps = SGM_RESNET_NORM_EPS
    return changed
