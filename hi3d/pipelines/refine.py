"""``RefinePipeline``: stage-1 orbit frames (+ input image, elevation) -> refined frames at the stage-2
resolution (1024² in the paper; tiny configs use 2× the input), paper §4.3.

As the release (``pipeline_i2v_eval_v02.py``): the stage-1 frames are upsampled bilinearly (``upsample_mode``),
frame 0 replaced by the input image; conditions = per-frame VAE latents and packed depth of the
noise-augmented (0.02) frames; the shared sampler (``hi3d.models.sampler``) runs 25 Euler EDM steps over
Karras σ from σ_max 700 with guidance rising over the frames 1.0 -> 2.0 (unconditional = zero CLIP embedding
and zero [depth, latent] concat), ``start="release_blend"``: every step pulls the sample towards
z + σ_i ε₀, z = posterior sample × scaling factor of the upsampled frames. ``start="sdedit"`` (hi3d's
alternative) starts at step round((1 − strength)·steps) from z + σ ε₀ instead. Frame 0 of the output is the
input image (``replace_first_frame``).

Ablations: ``use_depth=False`` feeds zeros in the depth channels; "no stage 2" is the caller's choice:
use ``upsample(frames, size)`` (the same upsampling the refiner starts from) instead of ``refine``.

``low_memory=True``: VAE encode one frame and decode ≤ 2 frames at a time (the temporal decoder mixes the
frames of a chunk, so the chunk size changes the output slightly, as SVD's ``decode_chunk_size``), conditional and
unconditional UNet passes one after the other (not batched), and on an accelerator whole-model CPU offload
(``hi3d.pipelines.placement``: each component visits the device only while it runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hi3d.errors import ConfigError
from hi3d.models import sampler
from hi3d.models.conditioning import added_time_ids
from hi3d.models.stage2 import Stage2Components, Stage2Config, encode_videos, frame_conditions, load_stage2
from hi3d.models.svd import clip_embed
from hi3d.pipelines.base import VideoDiffusionPipeline

UPSAMPLE_MODES = ("bilinear", "bicubic")


def upsample(frames01: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """``[B, F, 3, h, w]`` in [0, 1] -> ``[B, F, 3, size, size]``. ``"bilinear"``: the release's (``cv2.resize``
    INTER_LINEAR: half-pixel centres, no antialias); ``"bicubic"``: antialiased when shrinking, clamped to [0, 1]."""
    if mode not in UPSAMPLE_MODES:
        raise ConfigError(f"upsample mode '{mode}' is not one of: {', '.join(UPSAMPLE_MODES)}")
    if frames01.shape[-2:] == (size, size):
        return frames01.float()
    x = frames01.flatten(0, 1).float()
    if mode == "bilinear":
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    else:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                          antialias=frames01.shape[-1] > size).clamp(0, 1)
    return x.unflatten(0, frames01.shape[:2])


class RefinePipeline(VideoDiffusionPipeline):
    """Stage-2 sampler over components: ``RefinePipeline(unet, vae, image_encoder, feature_extractor, depth,
    config)``, ``from_pretrained(folder, **overrides)``, ``save_pretrained(folder)``, ``to(device)``."""

    components_class = Stage2Components
    config_class = Stage2Config
    load_components = staticmethod(load_stage2)

    def __init__(self, unet, vae, image_encoder, feature_extractor, depth, config: Stage2Config | None = None):
        super().__init__(config, unet=unet, vae=vae, image_encoder=image_encoder,
                         feature_extractor=feature_extractor, depth=depth)

    @torch.no_grad()
    def refine(self, frames: torch.Tensor, elevation: torch.Tensor | float, image: torch.Tensor | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None, size: int | None = None,
               num_inference_steps: int | None = None, strength: float | None = None,
               min_guidance: float | None = None, max_guidance: float | None = None,
               noise_aug: float | None = None) -> torch.Tensor:
        """``frames [B, F, 3, h, w]`` in [0, 1] (stage-1 output; white background), ``elevation [B]`` degrees,
        ``image [B, 3, H', W']`` in [0, 1] the input view (default: frame 0) -> ``[B, F, 3, S, S]`` in [0, 1],
        S = ``size`` or ``config.resolution``. One generator per video (all of that video's noise: condition
        augmentation, posterior sample, ε₀), or one for the batch. ``strength``: the ``"sdedit"`` start's."""
        cfg = self.config
        sampler.check_start(cfg.start)
        if strength is not None and cfg.start != "sdedit":
            raise ConfigError(f"refine strength applies to start=sdedit only (this pipeline's start is '{cfg.start}')")
        strength = cfg.strength if strength is None else strength
        aug = cfg.noise_aug if noise_aug is None else noise_aug
        chunk = 1 if cfg.low_memory else None
        device, S = self.device, size or cfg.resolution
        B = frames.shape[0]
        gens = sampler.video_generators(generator, B)
        up = upsample(frames, S, cfg.upsample_mode).to(device)
        image = up[:, 0] if image is None else upsample(image[:, None], S, cfg.upsample_mode)[:, 0].to(device)
        up[:, 0] = image
        with self.placement.use(self.image_encoder):
            clip = clip_embed(self.image_encoder, self.feature_extractor, image * 2 - 1).float()
        with self.placement.use(self.vae, self.depth):
            concat = frame_conditions(self.components, cfg, up, torch.full((B,), aug), gens, chunk=chunk)
            z0 = None if cfg.start == "noise" else encode_videos(self.vae, up * 2 - 1, gens,
                                                                  chunk or cfg.vae_encode_chunk)
        elevation = torch.as_tensor(elevation, dtype=torch.float32, device=device).reshape(-1).expand(B)
        ids = added_time_ids(cfg.slots, elevation, torch.full((B,), aug, device=device), cfg.constant_value)
        with self.placement.use(self.unet):
            x = self.sample_latents(concat, clip, ids, gens, num_inference_steps or cfg.num_inference_steps,
                                    cfg.min_guidance if min_guidance is None else min_guidance,
                                    cfg.max_guidance if max_guidance is None else max_guidance,
                                    cfg.start, z0, strength, cfg.blend_power, sequential=cfg.low_memory)
        with self.placement.use(self.vae):
            out = self.decode(x, min(cfg.decode_chunk_size, 2) if cfg.low_memory else cfg.decode_chunk_size)
        if cfg.replace_first_frame:
            out[:, 0] = image.to(out)
        return out.cpu()

    def __call__(self, frames: torch.Tensor, elevation_deg: float, image: torch.Tensor | None = None,
                 seed: int = 0, **kwargs) -> torch.Tensor:
        """One orbit ``frames [F, 3, h, w]`` (or a batch ``[B, F, 3, h, w]``) in [0, 1] -> refined frames
        of the same rank. ``kwargs`` as ``refine``."""
        single = frames.ndim == 4
        batch = frames[None] if single else frames
        img = None if image is None else (image[None] if image.ndim == 3 else image)
        out = self.refine(batch, elevation_deg, img, torch.Generator().manual_seed(seed), **kwargs)
        return out[0] if single else out
