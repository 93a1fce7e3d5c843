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

Training (``Stage2Task``): ground-truth orbits degraded on the fly (``hi3d.data.degradation``, from the
loop's generator) give Ĵ; depth and latents of Ĵ are the conditions; EDM v-prediction loss on the clean
frames at the target resolution (same σ sampling, weighting, noise augmentation and condition dropout
as stage 1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hi3d.data.degradation import DegradationConfig, degrade_video
from hi3d.errors import Hi3DError
from hi3d.models import edm
from hi3d.models.conditioning import added_time_ids, check_slots, widen_conv_in
from hi3d.models.depth import DepthConfig, DepthEstimator, depth_channels, tiny_depth_estimator
from hi3d.models.stage1 import Stage1Config, VideoDiffusionConfig, load_stage1
from hi3d.models.svd import (
    clip_embed,
    encode_frames,
    module_device_dtype,
    prepare_for_training,
    randn,
    unet_forward,
    vae_scale_factor,
)

SVD_IN_CHANNELS = 8


@dataclasses.dataclass
class Stage2Config(VideoDiffusionConfig):
    """Model, objective and sampling settings of stage 2 (paper / released values by default). ``pretrained``
    may also be a stage-2 folder (``RefinePipeline.save_pretrained`` or ``scripts/convert_checkpoint.py
    --stage 2``); ``cond_dropout`` drops the CLIP embedding and the [depth, frame latents] concat."""
    resolution: int = 1024
    slots: list[str] = dataclasses.field(default_factory=lambda: ["elevation", "noise_aug"])
    max_guidance: float = 2.0
    use_depth: bool = True
    """Ablation switch: False feeds zeros in the depth channels (they stay in the layout)."""
    depth: DepthConfig = dataclasses.field(default_factory=DepthConfig)
    degradation: DegradationConfig = dataclasses.field(default_factory=DegradationConfig)
    strength: float = 0.8
    """SDEdit start: begin at step round((1 − strength)·steps) from the upsampled stage-1 latents noised to
    that step's σ; 1.0 = from pure noise."""
    low_memory: bool = False
    """Chunked VAE (encode 1 frame, decode ≤ 2 frames at a time), cond/uncond UNet passes one after the other, SDPA attention and
    accelerate model CPU offload (CUDA only; a no-op on CPU)."""
    replace_first_frame: bool = True
    """Frame 0 of the output = the input image at the output size."""


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


@torch.no_grad()
def frame_conditions(components: Stage2Components, cfg: Stage2Config, frames01: torch.Tensor,
                     noise_aug: torch.Tensor, generator: torch.Generator | None, chunk: int | None = None):
    """Per-frame conditions of Ĵ ``frames01 [B, F, 3, H, W]`` in [0, 1] at the target size:
    ``concat [B, F, D + 4, h, w]`` = [packed depth (zeros if not use_depth), unscaled latent mode of
    (Ĵ·2−1 + a·ε)] with per-video strengths ``noise_aug [B]``."""
    vae = components.vae
    device, _ = module_device_dtype(vae)
    B, Fr, _, H, W = frames01.shape
    f = vae_scale_factor(vae)
    x = frames01.to(device, torch.float32) * 2 - 1
    noisy = x + edm.append_dims(noise_aug.to(device), 5) * randn(x.shape, generator, device)
    chunk = chunk or cfg.vae_encode_chunk
    lat = torch.cat([vae.encode(c.to(next(vae.parameters()).dtype)).latent_dist.mode().float()
                     for c in noisy.flatten(0, 1).split(chunk)]).unflatten(0, (B, Fr))
    if cfg.use_depth:
        depth = components.depth(frames01, (H // f, W // f)).to(device, torch.float32)
    else:
        depth = torch.zeros(B, Fr, depth_channels(cfg.depth), H // f, W // f, device=device)
    return torch.cat([depth, lat], dim=2)


class Stage2Task:
    """Stage 2 for the shared training loop (``hi3d.training.task.DiffusionTask``).

    Batch: ``frames [B, F, 3, H, W]`` in [-1, 1] (clean orbit, white background, frame 0 = input view),
    ``elevation [B]``. Step: Ĵ = degrade(frames) (``cfg.degradation``, frame 0 clean); z = VAE(frames)·s;
    concat = [depth(Ĵ), mode(VAE(Ĵ + a·ε))]; CLIP(frame 0); ids = slots(elevation, a); CLIP and concat
    dropped with p = cond_dropout each; loss = mean λ(σ)‖D(z + σε; σ) − z‖² (as stage 1).
    A batch may carry ``degraded`` (``[B, F, 3, H, W]`` in [-1, 1]) to skip the on-the-fly degradation.
    """

    def __init__(self, cfg: Stage2Config, components: Stage2Components | None = None):
        check_slots(cfg.slots)
        self.cfg = cfg
        c = components or build_components(cfg)
        self.unet, self.vae, self.image_encoder, self.feature_extractor, self.depth = (
            c.unet, c.vae, c.image_encoder, c.feature_extractor, c.depth)
        if self.unet.config.in_channels != in_channels(cfg):
            raise Hi3DError(f"stage-2 UNet has {self.unet.config.in_channels} input channels, config needs "
                            f"{in_channels(cfg)}")
        prepare_for_training(self.unet, cfg.gradient_checkpointing, cfg.trainable_params)

    @property
    def components(self) -> Stage2Components:
        return Stage2Components(self.unet, self.vae, self.image_encoder, self.feature_extractor, self.depth)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.image_encoder, self.depth]

    def degrade(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Ĵ ``[B, F, 3, H, W]`` in [0, 1]: ``batch['degraded']`` if given, else degraded ``batch['frames']``."""
        if "degraded" in batch:
            return (batch["degraded"].float() + 1) / 2
        frames01 = (batch["frames"].float() + 1) / 2
        return degrade_video(frames01, self.cfg.degradation, generator, out_size=tuple(frames01.shape[-2:]))

    @torch.no_grad()
    def conditions(self, batch: dict, generator: torch.Generator | None):
        """``(z [B,F,4,h,w], concat [B,F,D+4,h,w], clip [B,1,D'], ids [B,S])`` for one training batch."""
        cfg = self.cfg
        device, _ = module_device_dtype(self.vae)
        frames = batch["frames"].to(device, torch.float32)
        B = frames.shape[0]
        gdev = generator.device if generator is not None else "cpu"
        degraded = self.degrade(batch, generator).to(device)
        z = encode_frames(self.vae, frames, generator, sample=True, chunk=cfg.vae_encode_chunk).float()
        aug = edm.noise_aug_strength(B, generator, cfg.noise_aug_mean, cfg.noise_aug_std, device=gdev).to(device)
        concat = frame_conditions(self.components, cfg, degraded, aug, generator)
        clip = clip_embed(self.image_encoder, self.feature_extractor, frames[:, 0]).float()
        keep_clip = edm.condition_dropout(B, cfg.cond_dropout, generator, gdev).to(device)
        keep_cat = edm.condition_dropout(B, cfg.cond_dropout, generator, gdev).to(device)
        ids = added_time_ids(cfg.slots, batch["elevation"].to(device), aug, cfg.constant_value)
        return z, concat * edm.append_dims(keep_cat, 5), clip * edm.append_dims(keep_clip, 3), ids

    def training_loss(self, unet: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        z, concat, clip, ids = self.conditions(batch, generator)
        return edm.denoising_loss(lambda x, c: unet_forward(unet, x, c, concat, clip, ids), z, self.cfg.P_mean,
                                  self.cfg.P_std, generator)

    @torch.no_grad()
    def sample(self, unet: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Validation: degrade the batch's frames (from ``generator``), refine them; ``[B, F, 3, H, W]``."""
        from hi3d.pipelines.refine import RefinePipeline

        degraded = self.degrade(batch, generator)
        pipe = RefinePipeline(unet, self.vae, self.image_encoder, self.feature_extractor, self.depth, self.cfg)
        image = (batch["frames"][:, 0].float() + 1) / 2
        return pipe.refine(degraded, batch["elevation"], image=image, generator=generator)

    def save_pretrained(self, unet: torch.nn.Module, folder: str | Path) -> None:
        from hi3d.pipelines.refine import RefinePipeline

        RefinePipeline(unet, self.vae, self.image_encoder, self.feature_extractor, self.depth,
                       self.cfg).save_pretrained(folder)

