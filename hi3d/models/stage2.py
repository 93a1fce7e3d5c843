"""Stage 2, the 3D-aware video refiner (paper §4.3): SVD video-to-video at 1024², conditioned on the
per-frame VAE latents and the estimated depth of a low-quality orbit Ĵ.

UNet input channels (released Hi3D layout, 17 = 4 + 9 + 4 with unshuffled depth)::

    [0:4]        noisy frame latents (× c_in)
    [4:4+D]      packed depth of Ĵ (``hi3d.models.depth``; D = 9 unshuffled, 1 resized; zeros if use_depth=False)
    [4+D:8+D]    VAE latent of each frame of Ĵ (posterior mode, unscaled, of the noise-augmented frame — as
                 SVD's conditioning image, but per frame instead of frame 0 repeated)

Initialised from SVD's 8-channel conv_in: its weights move to [noisy, frame latent] (channels 0–3 and
4+D..7+D) and the depth columns are zero, so at initialisation the widened UNet given
[noisy, depth, latents] returns exactly what SVD's UNet returns for [noisy, latents] (tested < 1e-6).
``added_time_ids``: ``[elevation, noise_aug]`` (512-d projection; SVD's noise-aug columns kept, the
elevation columns zero).

Training (``hi3d.training.stage2.Stage2Task``): ground-truth orbits degraded on the fly (``hi3d.data.degradation``, from the
loop's generator) give Ĵ; depth and latents of Ĵ are the conditions; EDM v-prediction loss on the clean
frames at the target resolution (same σ sampling, weighting, noise augmentation and condition dropout
as stage 1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hi3d.data.degradation import DegradationConfig
from hi3d.errors import Hi3DError
from hi3d.models import edm, sampler
from hi3d.models.conditioning import widen_conv_in
from hi3d.models.depth import DepthConfig, DepthEstimator, depth_channels, tiny_depth_estimator
from hi3d.models.stage1 import Stage1Config, VideoDiffusionConfig, load_stage1
from hi3d.models.svd import encode_frames, module_device_dtype, vae_scale_factor

SVD_IN_CHANNELS = 8


@dataclasses.dataclass
class Stage2Config(VideoDiffusionConfig):
    """Model, objective and sampling settings of stage 2 (paper / released values by default). ``pretrained``
    may also be a stage-2 folder (``RefinePipeline.save_pretrained`` or ``scripts/convert_checkpoint.py
    --stage 2``); ``cond_dropout`` drops the CLIP embedding and the frame latents, ``depth_dropout`` the depth."""
    resolution: int = 1024
    slots: list[str] = dataclasses.field(default_factory=lambda: ["elevation", "noise_aug"])
    max_guidance: float = 2.0
    use_depth: bool = True
    """Ablation switch: False feeds zeros in the depth channels (they stay in the layout)."""
    depth: DepthConfig = dataclasses.field(default_factory=DepthConfig)
    depth_dropout: float = 0.0
    """Training: probability of zeroing a video's depth condition (the release's DepthEmbedder has ucg_rate 0: never;
    guidance's unconditional pass zeroes it all the same)."""
    degradation: DegradationConfig = dataclasses.field(default_factory=DegradationConfig)
    start: str = "release_blend"
    """Sampler start (``hi3d.models.sampler.START_MODES``): release_blend (the release's: from noise, pulled towards
    the noised stage-1 latents at every step) | sdedit (hi3d's: from the stage-1 latents noised to the σ of step
    round((1 − strength)·steps), no blending) | noise (ignore the stage-1 latents)."""
    strength: float = 0.8
    """SDEdit strength (``start=sdedit`` only)."""
    blend_power: float = 40.0
    """release_blend: α_i = (½(1 + cos(i/steps)))^blend_power."""
    upsample_mode: str = "bilinear"
    """Stage-1 frames to the stage-2 size: bilinear (the release's) | bicubic."""
    low_memory: bool = False
    """Chunked VAE (encode 1 frame, decode ≤ 2 frames at a time), cond/uncond UNet passes one after the other, SDPA attention and
    accelerate model CPU offload (CUDA only; a no-op on CPU)."""
    replace_first_frame: bool = True
    """Frame 0 of the output = the input image at the output size (the release's stage 2)."""


@dataclasses.dataclass
class Stage2Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    image_encoder: torch.nn.Module
    feature_extractor: object
    depth: DepthEstimator


def in_channels(cfg: Stage2Config) -> int:
    return 4 + depth_channels(cfg.depth) + 4


def widen_for_stage2(unet, cfg: Stage2Config) -> None:
    """SVD's 8-channel conv_in -> [noisy, depth, frame latents] with zero depth columns (in place)."""
    d = depth_channels(cfg.depth)
    if unet.config.in_channels == in_channels(cfg):
        return
    if unet.config.in_channels != SVD_IN_CHANNELS:
        raise Hi3DError(f"UNet has {unet.config.in_channels} input channels: expected SVD's {SVD_IN_CHANNELS} or "
                        f"stage 2's {in_channels(cfg)} (depth packing '{cfg.depth.packing}')")
    widen_conv_in(unet, in_channels(cfg), [0, 1, 2, 3] + list(range(4 + d, 8 + d)))


def _stage1_view(cfg: Stage2Config) -> Stage1Config:
    return Stage1Config(num_frames=cfg.num_frames, resolution=cfg.resolution, slots=list(cfg.slots),
                        constant_value=cfg.constant_value, tiny=cfg.tiny)


def tiny_components(cfg: Stage2Config) -> Stage2Components:
    """Tiny random components with the stage-2 layout (seeded by ``cfg.tiny.seed``); depth: tiny DPT-Hybrid."""
    from hi3d.models import stage1

    c = stage1.tiny_components(_stage1_view(cfg))
    widen_for_stage2(c.unet, cfg)
    depth = tiny_depth_estimator(dataclasses.replace(cfg.depth, input_size=32), seed=cfg.tiny.seed + 1)
    return Stage2Components(c.unet, c.vae, c.image_encoder, c.feature_extractor, depth)


def load_stage2(folder: str | Path | None, cfg: Stage2Config, torch_dtype=None) -> Stage2Components:
    """Components from a local folder: SVD (conv_in widened, slots adapted) or a stage-2 folder. The depth
    model comes from ``folder/depth`` if present, else ``cfg.depth.pretrained``."""
    c = load_stage1(folder, _stage1_view(cfg), torch_dtype=torch_dtype)
    widen_for_stage2(c.unet, cfg)
    depth_dir = Path(folder) / "depth"
    dcfg = dataclasses.replace(cfg.depth, pretrained=str(depth_dir)) if (depth_dir / "config.json").is_file() \
        else cfg.depth
    depth = DepthEstimator.from_pretrained(dcfg, torch_dtype=torch_dtype)
    return Stage2Components(c.unet, c.vae, c.image_encoder, c.feature_extractor, depth)


def build_components(cfg: Stage2Config) -> Stage2Components:
    return tiny_components(cfg) if cfg.tiny.enabled else load_stage2(cfg.pretrained, cfg)


def encode_videos(vae, frames: torch.Tensor, generators, chunk: int = 16) -> torch.Tensor:
    """Posterior samples × scaling factor ``[B, F, 4, h, w]`` of ``frames [B, F, 3, H, W]`` in [-1, 1], video b
    drawn from ``generators[b]`` (distinct generators) or the batch from one generator."""
    gens = list(generators)
    if sampler.per_video(gens):
        return torch.cat([encode_frames(vae, frames[b:b + 1], g, sample=True, chunk=chunk) for b, g in enumerate(gens)])
    return encode_frames(vae, frames, gens[0], sample=True, chunk=chunk)


@torch.no_grad()
def frame_conditions(components: Stage2Components, cfg: Stage2Config, frames01: torch.Tensor,
                     noise_aug: torch.Tensor, generator, chunk: int | None = None):
    """Per-frame conditions of Ĵ ``frames01 [B, F, 3, H, W]`` in [0, 1] at the target size:
    ``concat [B, F, D + 4, h, w]`` = [packed depth (zeros if not use_depth), unscaled latent mode], both of the
    noise-augmented frames Ĵ·2−1 + a·ε (as the release, whose depth embedder reads the augmented condition
    frames), per-video strengths ``noise_aug [B]``; ε per video from ``generator`` (one per video, or one)."""
    vae = components.vae
    device, _ = module_device_dtype(vae)
    B, Fr, _, H, W = frames01.shape
    f = vae_scale_factor(vae)
    gens = sampler.video_generators(generator, B)
    x = frames01.to(device, torch.float32) * 2 - 1
    noisy = x + edm.append_dims(noise_aug.to(device), 5) * sampler.batch_randn(gens, x.shape[1:], device)
    chunk = chunk or cfg.vae_encode_chunk
    lat = torch.cat([vae.encode(c.to(next(vae.parameters()).dtype)).latent_dist.mode().float()
                     for c in noisy.flatten(0, 1).split(chunk)]).unflatten(0, (B, Fr))
    if cfg.use_depth:
        depth = components.depth((noisy + 1) / 2, (H // f, W // f)).to(device, torch.float32)
    else:
        depth = torch.zeros(B, Fr, depth_channels(cfg.depth), H // f, W // f, device=device)
    return torch.cat([depth, lat], dim=2)
