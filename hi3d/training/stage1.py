"""Stage 1's task for the shared training loop (``hi3d.training.loop``): the EDM loss of the orbit generator
(``hi3d.models.stage1``) and validation sampling / saving through ``hi3d.pipelines.orbit.OrbitPipeline``."""

from __future__ import annotations

from pathlib import Path

import torch

from hi3d.models import edm
from hi3d.models.conditioning import added_time_ids, check_slots
from hi3d.models.stage1 import Stage1Components, Stage1Config, build_components
from hi3d.models.svd import (
    clip_embed,
    encode_condition,
    encode_frames,
    module_device_dtype,
    prepare_for_training,
    randn,
    unet_forward,
)
from hi3d.pipelines.orbit import OrbitPipeline


class Stage1Task:
    """Stage 1 for the shared training loop (``hi3d.training.task.DiffusionTask``).

    Batch: ``frames [B, F, 3, H, W]`` in [-1, 1] (white background, frame 0 = input view),
    ``elevation [B]`` degrees. One training step (sgm/SVD recipe):
    frame latents z = VAE(frames)·s (posterior sample); ln σ ~ N(P_mean, P_std²) per video;
    noise-aug strength a = exp(N(−3, 0.5²)); condition latent = mode(VAE(frame0 + a·ε)) (unscaled),
    concatenated to every frame; CLIP(frame0) to cross-attention; ids = slots(elevation, a);
    CLIP embedding and condition latent are each zeroed with p = ``cond_dropout`` (independently, as sgm's
    per-embedder ``ucg_rate``; the ids are never dropped); loss = mean λ(σ)·‖D(z + σε; σ) − z‖².
    """

    def __init__(self, cfg: Stage1Config, components: Stage1Components | None = None):
        check_slots(cfg.slots)
        self.cfg = cfg
        c = components or build_components(cfg)
        self.unet, self.vae, self.image_encoder, self.feature_extractor = (c.unet, c.vae, c.image_encoder,
                                                                          c.feature_extractor)
        prepare_for_training(self.unet, cfg.gradient_checkpointing, cfg.trainable_params)

    @property
    def components(self) -> Stage1Components:
        return Stage1Components(self.unet, self.vae, self.image_encoder, self.feature_extractor)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.image_encoder]

    @torch.no_grad()
    def conditions(self, frames: torch.Tensor, elevation: torch.Tensor, generator: torch.Generator | None):
        """Training targets and conditions: ``(z [B,F,4,h,w], concat [B,F,4,h,w], clip [B,1,D], ids [B,S])``."""
        cfg = self.cfg
        B, Fr = frames.shape[:2]
        device, _ = module_device_dtype(self.vae)
        gdev = generator.device if generator is not None else "cpu"  # draws on the generator's device
        frames = frames.to(device, torch.float32)
        z = encode_frames(self.vae, frames, generator, sample=True, chunk=cfg.vae_encode_chunk).float()
        aug = edm.noise_aug_strength(B, generator, cfg.noise_aug_mean, cfg.noise_aug_std, gdev).to(device)
        image = frames[:, 0]
        cond = encode_condition(self.vae, image + edm.append_dims(aug, 4) * randn(image.shape, generator, device))
        clip = clip_embed(self.image_encoder, self.feature_extractor, image).float()
        keep_clip = edm.condition_dropout(B, cfg.cond_dropout, generator, gdev).to(device)
        keep_cond = edm.condition_dropout(B, cfg.cond_dropout, generator, gdev).to(device)
        clip = clip * edm.append_dims(keep_clip, 3)
        concat = (cond.float() * edm.append_dims(keep_cond, 4)).unsqueeze(1).expand(-1, Fr, -1, -1, -1)
        ids = added_time_ids(cfg.slots, torch.as_tensor(elevation).reshape(B).to(device), aug, cfg.constant_value)
        return z, concat, clip, ids

    def training_loss(self, unet: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        z, concat, clip, ids = self.conditions(batch["frames"], batch["elevation"], generator)
        return edm.denoising_loss(lambda x, c: unet_forward(unet, x, c, concat, clip, ids), z, self.cfg.P_mean,
                                  self.cfg.P_std, generator)

    @torch.no_grad()
    def sample(self, unet: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        pipe = OrbitPipeline(unet, self.vae, self.image_encoder, self.feature_extractor, self.cfg)
        image = (batch["frames"][:, 0].float() + 1) / 2
        return pipe.generate(image, batch["elevation"], generators=generator)

    def save_pretrained(self, unet: torch.nn.Module, folder: str | Path) -> None:
        OrbitPipeline(unet, self.vae, self.image_encoder, self.feature_extractor, self.cfg).save_pretrained(folder)
