"""Stage 2's task for the shared training loop (``hi3d.training.loop``): degradation of the ground-truth orbit,
the EDM loss of the refiner (``hi3d.models.stage2``) and validation / saving through
``hi3d.pipelines.refine.RefinePipeline``."""

from __future__ import annotations

from pathlib import Path

import torch

from hi3d.data.degradation import degrade_video
from hi3d.errors import Hi3DError
from hi3d.models import edm
from hi3d.models.conditioning import added_time_ids, check_slots
from hi3d.models.stage2 import Stage2Components, Stage2Config, build_components, frame_conditions, in_channels
from hi3d.models.svd import clip_embed, encode_frames, module_device_dtype, prepare_for_training, unet_forward
from hi3d.pipelines.refine import RefinePipeline


class Stage2Task:
    """Stage 2 for the shared training loop (``hi3d.training.task.DiffusionTask``).

    Batch: ``frames [B, F, 3, H, W]`` in [-1, 1] (clean orbit, white background, frame 0 = input view),
    ``elevation [B]``. Step: Ĵ = degrade(frames) (``cfg.degradation``, frame 0 clean); z = VAE(frames)·s;
    concat = [depth(Ĵ + a·ε), mode(VAE(Ĵ + a·ε))]; CLIP(frame 0); ids = slots(elevation, a); CLIP and the frame
    latents dropped with p = cond_dropout each, the depth with p = depth_dropout (the release: 0);
    loss = mean λ(σ)‖D(z + σε; σ) − z‖² (as stage 1).
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
        keep_lat = edm.condition_dropout(B, cfg.cond_dropout, generator, gdev).to(device)
        keep_depth = edm.condition_dropout(B, cfg.depth_dropout, generator, gdev).to(device)
        D = concat.shape[2] - 4
        keep = torch.cat([keep_depth[:, None].expand(B, D), keep_lat[:, None].expand(B, 4)], 1)  # [B, D + 4]
        ids = added_time_ids(cfg.slots, batch["elevation"].to(device), aug, cfg.constant_value)
        return z, concat * keep[:, None, :, None, None], clip * edm.append_dims(keep_clip, 3), ids

    def training_loss(self, unet: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        z, concat, clip, ids = self.conditions(batch, generator)
        return edm.denoising_loss(lambda x, c: unet_forward(unet, x, c, concat, clip, ids), z, self.cfg.P_mean,
                                  self.cfg.P_std, generator)

    @torch.no_grad()
    def sample(self, unet: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Validation: degrade the batch's frames (from ``generator``), refine them; ``[B, F, 3, H, W]``."""
        degraded = self.degrade(batch, generator)
        pipe = RefinePipeline(unet, self.vae, self.image_encoder, self.feature_extractor, self.depth, self.cfg)
        image = (batch["frames"][:, 0].float() + 1) / 2
        return pipe.refine(degraded, batch["elevation"], image=image, generator=generator)

    def save_pretrained(self, unet: torch.nn.Module, folder: str | Path) -> None:
        RefinePipeline(unet, self.vae, self.image_encoder, self.feature_extractor, self.depth,
                       self.cfg).save_pretrained(folder)
