"""``RefinePipeline``: stage-1 orbit frames (+ input image, elevation) -> refined frames at the stage-2
resolution (1024² in the paper; tiny configs use 2× the input), paper §4.3.

Sampler: Euler EDM over 25 Karras σ (σ_max 700), classifier-free guidance rising over the frames 1.0 -> 2.0
(unconditional = zero CLIP embedding and zero [depth, latent] concat), conditions = per-frame VAE latents
and packed depth of the bicubically upsampled stage-1 frames (noise-augmented 0.02), started SDEdit-style
from the upsampled stage-1 latents noised to the σ of step round((1 − strength)·steps).

Ablations: ``use_depth=False`` feeds zeros in the depth channels; "no stage 2" is the caller's choice:
use ``upsample(frames, size)`` (the same bicubic upsampling the refiner starts from) instead of ``refine``.

``low_memory=True``: VAE encode one frame and decode ≤ 2 frames at a time (the temporal decoder mixes the
frames of a chunk, so the chunk size changes the output slightly, as SVD's ``decode_chunk_size``), conditional and
unconditional UNet passes one after the other (not batched), SDPA attention processors, and model CPU offload: on CUDA every model
lives on the CPU and is moved to the GPU only while it runs (diffusers' "model CPU offload" behaviour,
done by explicit moves because the SVD helpers place inputs on a module's parameter device); on a CPU
device offloading is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from hi3d.config import to_dict
from hi3d.errors import Hi3DError
from hi3d.io import atomic_folder, write_json
from hi3d.models import edm
from hi3d.models.conditioning import added_time_ids
from hi3d.models.stage1 import PIPELINE_FILE
from hi3d.models.stage2 import Stage2Components, Stage2Config, frame_conditions, load_stage2
from hi3d.models.svd import clip_embed, decode_latents, encode_frames, randn, unet_forward, vae_scale_factor


def upsample(frames01: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, F, 3, h, w]`` in [0, 1] -> ``[B, F, 3, size, size]`` (bicubic, clamped)."""
    if frames01.shape[-2:] == (size, size):
        return frames01.float()
    x = F.interpolate(frames01.flatten(0, 1).float(), size=(size, size), mode="bicubic", align_corners=False,
                      antialias=frames01.shape[-1] > size)
    return x.clamp(0, 1).unflatten(0, frames01.shape[:2])


class RefinePipeline:
    """Stage-2 sampler over components: ``RefinePipeline(unet, vae, image_encoder, feature_extractor, depth,
    config)``, ``from_pretrained(folder)``, ``save_pretrained(folder)``, ``to(device)``."""

    def __init__(self, unet, vae, image_encoder, feature_extractor, depth, config: Stage2Config | None = None):
        self.unet, self.vae, self.image_encoder, self.feature_extractor, self.depth = (
            unet, vae, image_encoder, feature_extractor, depth)
        self.config = config or Stage2Config()
        self._device = next(unet.parameters()).device

    @classmethod
    def from_components(cls, c: Stage2Components, config: Stage2Config) -> RefinePipeline:
        return cls(c.unet, c.vae, c.image_encoder, c.feature_extractor, c.depth, config)

    @property
    def components(self) -> Stage2Components:
        return Stage2Components(self.unet, self.vae, self.image_encoder, self.feature_extractor, self.depth)

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype=None, device=None, **overrides) -> RefinePipeline:
        """A folder from ``save_pretrained`` / the stage-2 converter (config in ``hi3d_pipeline.json``), or an
        SVD folder (paper defaults, conv_in widened; depth from ``depth_pretrained``). ``overrides``:
        ``key=value`` strings' keys and values, e.g. ``low_memory=True``."""
        from hi3d.config import load_config

        folder = Path(folder)
        meta = folder / PIPELINE_FILE
        items = [f"pretrained={folder}"] + [f"{k}={v}" for k, v in overrides.items()]
        cfg = load_config(Stage2Config, meta if meta.is_file() else None, items)
        cfg.tiny.enabled = False
        pipe = cls.from_components(load_stage2(folder, cfg, torch_dtype=torch_dtype), cfg)
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``unet/ vae/ image_encoder/ feature_extractor/ depth/`` + ``hi3d_pipeline.json`` (the
        stage-2 config) to a temporary folder, then swap it in."""
        with atomic_folder(folder) as tmp:
            getattr(self.unet, "module", self.unet).save_pretrained(tmp / "unet")
            self.vae.save_pretrained(tmp / "vae")
            self.image_encoder.save_pretrained(tmp / "image_encoder")
            self.feature_extractor.save_pretrained(tmp / "feature_extractor")
            self.depth.save_pretrained(tmp / "depth")
            cfg = to_dict(self.config)
            cfg["pretrained"], cfg["depth"]["pretrained"] = None, None
            cfg["tiny"]["enabled"] = False
            write_json(tmp / PIPELINE_FILE, cfg)

    def _models(self):
        return (self.unet, self.vae, self.image_encoder, self.depth)

    def to(self, device=None, dtype=None) -> RefinePipeline:
        if device is not None:
            self._device = torch.device(device)
        offload = self.config.low_memory and self._device.type == "cuda"
        for m in self._models():
            m.to(device="cpu" if offload else device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self._device

    @contextlib.contextmanager
    def _use(self, *modules):
        """Model CPU offload: on CUDA with ``low_memory``, ``modules`` visit the GPU only inside the block."""
        offload = self.config.low_memory and self._device.type == "cuda"
        if offload:
            for m in modules:
                m.to(self._device)
        try:
            yield
        finally:
            if offload:
                for m in modules:
                    m.to("cpu")
                torch.cuda.empty_cache()

    def _set_sdpa(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet.set_attn_processor(AttnProcessor2_0())

    @torch.no_grad()
    def refine(self, frames: torch.Tensor, elevation: torch.Tensor | float, image: torch.Tensor | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None, size: int | None = None,
               num_inference_steps: int | None = None, strength: float | None = None,
               min_guidance: float | None = None, max_guidance: float | None = None,
               noise_aug: float | None = None) -> torch.Tensor:
        """``frames [B, F, 3, h, w]`` in [0, 1] (stage-1 output; white background), ``elevation [B]`` degrees,
        ``image [B, 3, H', W']`` in [0, 1] the input view (default: frame 0) -> ``[B, F, 3, S, S]`` in [0, 1],
        S = ``size`` or ``config.resolution``. One generator per video, or one for the batch."""
        cfg = self.config
        steps = num_inference_steps or cfg.num_inference_steps
        strength = cfg.strength if strength is None else strength
        gmin = cfg.min_guidance if min_guidance is None else min_guidance
        gmax = cfg.max_guidance if max_guidance is None else max_guidance
        aug = cfg.noise_aug if noise_aug is None else noise_aug
        if not 0 < strength <= 1:
            raise Hi3DError(f"refine strength {strength} must be in (0, 1]")
        if cfg.low_memory:
            self._set_sdpa()
        chunk = 1 if cfg.low_memory else None
        device, S = self.device, size or cfg.resolution
        B, Fr = frames.shape[:2]
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * B
        if len(gens) != B:
            raise Hi3DError(f"{len(gens)} generators for {B} videos")
        per_video = len(set(map(id, gens))) == B > 1

        def noise(shape):
            if per_video:
                return torch.cat([randn((1, *shape), g, device) for g in gens])
            return randn((B, *shape), gens[0], device)

        up = upsample(frames, S).to(device)
        image = up[:, 0] if image is None else upsample(image[:, None], S)[:, 0].to(device)
        up[:, 0] = image
        with self._use(self.image_encoder):
            clip = clip_embed(self.image_encoder, self.feature_extractor, image * 2 - 1).float()
        with self._use(self.vae, self.depth):
            concat = frame_conditions(self.components, cfg, up, torch.full((B,), aug), gens[0], chunk=chunk)
            f = vae_scale_factor(self.vae)
            z0 = None if strength >= 1 else encode_frames(self.vae, up * 2 - 1, sample=False,
                                                          chunk=chunk or cfg.vae_encode_chunk).float()
        elevation = torch.as_tensor(elevation, dtype=torch.float32, device=device).reshape(-1).expand(B)
        ids = added_time_ids(cfg.slots, elevation, torch.full((B,), aug, device=device), cfg.constant_value)
        scale = torch.linspace(gmin, gmax, Fr, device=device).view(1, Fr, 1, 1, 1)
        guided = gmax > 1.0 or gmin > 1.0
        zero_clip, zero_cat = torch.zeros_like(clip), torch.zeros_like(concat)

        def run(x, s, cat, emb, tid):
            return edm.denoise(lambda xi, c: unet_forward(self.unet, xi, c, cat, emb, tid), x, s)

        def denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
            s = torch.full((B,), sigma, device=device)
            if not guided:
                return run(x, s, concat, clip, ids)
            if cfg.low_memory:
                d_u, d_c = run(x, s, zero_cat, zero_clip, ids), run(x, s, concat, clip, ids)
            else:
                d_u, d_c = run(torch.cat([x, x]), torch.cat([s, s]), torch.cat([zero_cat, concat]),
                               torch.cat([zero_clip, clip]), torch.cat([ids, ids])).chunk(2)
            return d_u + scale * (d_c - d_u)

        sigmas = edm.karras_sigmas(steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).tolist()
        shape = (Fr, 4, S // f, S // f)
        if z0 is None:
            start, x = 0, noise(shape) * edm.initial_noise_scale(sigmas[0])
        else:
            start = min(steps - 1, round((1 - strength) * steps))
            x = z0 + sigmas[start] * noise(shape)
        with self._use(self.unet):
            for s, s_next in zip(sigmas[start:-1], sigmas[start + 1:]):
                x = edm.euler_step(x, denoiser(x, s), s, s_next)
        with self._use(self.vae):
            out = decode_latents(self.vae, x, min(cfg.decode_chunk_size, 2) if cfg.low_memory else cfg.decode_chunk_size)
        out = ((out + 1) / 2).clamp(0, 1)
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
