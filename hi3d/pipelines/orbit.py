"""``OrbitPipeline``: one image + a camera elevation -> an orbit of ``num_frames`` views and their cameras
(stage 1 inference, paper §4.2).

Euler EDM sampler (25 steps, Karras σ from σ_max = 700), classifier-free guidance whose scale rises
linearly over the frames (1.0 -> 2.5; unconditional = zero CLIP embedding and zero input latent, as
SVD), input noise-augmented with strength 0.02, frame 0 of the output replaced by the input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from hi3d import cameras
from hi3d.config import to_dict
from hi3d.errors import Hi3DError
from hi3d.io import atomic_folder, write_json
from hi3d.models import edm
from hi3d.models.conditioning import added_time_ids
from hi3d.models.stage1 import PIPELINE_FILE, Stage1Components, Stage1Config, load_stage1
from hi3d.models.svd import (
    clip_embed,
    decode_latents,
    encode_condition,
    module_device_dtype,
    randn,
    unet_forward,
    vae_scale_factor,
)
from hi3d.pipelines.preprocess import frame_object


@dataclasses.dataclass
class OrbitOutput:
    """frames ``[S, F, 3, H, W]`` float32 in [0, 1] (S samples, frame 0 = ``image``); image ``[3, H, W]``
    the preprocessed input; c2w ``[F, 4, 4]``, K ``[3, 3]`` float64 (hi3d.cameras convention, r = 1.5,
    FOV 49.1°); azimuth_deg, elevation_deg ``[F]``."""
    frames: torch.Tensor
    image: torch.Tensor
    c2w: torch.Tensor
    K: torch.Tensor
    azimuth_deg: torch.Tensor
    elevation_deg: torch.Tensor
    seeds: list[int] | None = None

    def to_orbit(self, sample: int = 0):
        """Sample ``sample`` as a ``hi3d.data.orbit.Orbit`` (opaque RGBA on white) for ``save_orbit``."""
        from hi3d.data.orbit import Orbit

        rgb = self.frames[sample].permute(0, 2, 3, 1).float()
        n = rgb.shape[0]
        return Orbit(rgba=torch.cat([rgb, torch.ones_like(rgb[..., :1])], -1), c2w=self.c2w,
                     K=self.K.expand(n, 3, 3).clone(), azimuth_deg=self.azimuth_deg, elevation_deg=self.elevation_deg,
                     radius=self.c2w[:, :3, 3].norm(dim=-1),
                     meta={"generator": "hi3d stage 1", "seed": self.seeds[sample] if self.seeds else None})


class OrbitPipeline:
    """Stage-1 sampler over components (diffusers style): ``OrbitPipeline(unet, vae, image_encoder,
    feature_extractor, config)``, ``from_pretrained(folder)``, ``save_pretrained(folder)``, ``to(device)``."""

    def __init__(self, unet, vae, image_encoder, feature_extractor, config: Stage1Config | None = None):
        self.unet, self.vae, self.image_encoder, self.feature_extractor = unet, vae, image_encoder, feature_extractor
        self.config = config or Stage1Config()

    @classmethod
    def from_components(cls, components: Stage1Components, config: Stage1Config) -> OrbitPipeline:
        return cls(components.unet, components.vae, components.image_encoder, components.feature_extractor, config)

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype=None, device=None) -> OrbitPipeline:
        """Load a folder written by ``save_pretrained`` (config from ``hi3d_pipeline.json``) or a plain SVD
        folder (paper defaults)."""
        from hi3d.config import load_config

        folder = Path(folder)
        meta = folder / PIPELINE_FILE
        cfg = load_config(Stage1Config, meta if meta.is_file() else None, [f"pretrained={folder}"])
        cfg.tiny.enabled = False
        pipe = cls.from_components(load_stage1(folder, cfg, torch_dtype=torch_dtype), cfg)
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``unet/ vae/ image_encoder/ feature_extractor/`` + ``hi3d_pipeline.json`` (the config, incl.
        the slot layout). Written to a temporary folder, then swapped in."""
        with atomic_folder(folder) as tmp:
            unwrap = getattr(self.unet, "module", self.unet)  # DDP-wrapped UNet from the training loop
            unwrap.save_pretrained(tmp / "unet")
            self.vae.save_pretrained(tmp / "vae")
            self.image_encoder.save_pretrained(tmp / "image_encoder")
            self.feature_extractor.save_pretrained(tmp / "feature_extractor")
            cfg = to_dict(self.config)
            cfg["pretrained"] = None
            cfg["tiny"]["enabled"] = False
            write_json(tmp / PIPELINE_FILE, cfg)

    def to(self, device=None, dtype=None) -> OrbitPipeline:
        for m in (self.unet, self.vae, self.image_encoder):
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return module_device_dtype(self.unet)[0]

    @torch.no_grad()
    def generate(self, image: torch.Tensor, elevation: torch.Tensor | float,
                 generators: torch.Generator | Sequence[torch.Generator] | None = None,
                 num_inference_steps: int | None = None, min_guidance: float | None = None,
                 max_guidance: float | None = None, noise_aug: float | None = None,
                 decode_chunk_size: int | None = None) -> torch.Tensor:
        """Core sampler on prepared inputs: ``image [B, 3, H, W]`` in [0, 1] (white background, H, W the
        output size), ``elevation [B]`` degrees. One generator per video (its noise depends only on it), or
        one for the batch. Returns ``[B, F, 3, H, W]`` in [0, 1] with frame 0 = ``image``."""
        cfg = self.config
        steps = num_inference_steps or cfg.num_inference_steps
        gmin = cfg.min_guidance if min_guidance is None else min_guidance
        gmax = cfg.max_guidance if max_guidance is None else max_guidance
        aug = cfg.noise_aug if noise_aug is None else noise_aug
        device = self.device
        B, _, H, W = image.shape
        Fr, f = cfg.num_frames, vae_scale_factor(self.vae)
        gens = list(generators) if isinstance(generators, (list, tuple)) else [generators] * B
        if len(gens) != B:
            raise Hi3DError(f"{len(gens)} generators for {B} videos")
        per_video = len(set(map(id, gens))) == B

        def noise(shape):  # [B, *shape], each video from its own generator when given one each
            if per_video:
                return torch.cat([randn((1, *shape), g, device) for g in gens])
            return randn((B, *shape), gens[0], device)

        x_m11 = image.to(device, torch.float32) * 2 - 1
        clip = clip_embed(self.image_encoder, self.feature_extractor, x_m11).float()
        cond = encode_condition(self.vae, x_m11 + aug * noise(x_m11.shape[1:])).float()
        concat = cond.unsqueeze(1).expand(-1, Fr, -1, -1, -1)
        elevation = torch.as_tensor(elevation, dtype=torch.float32, device=device).reshape(-1).expand(B)
        ids = added_time_ids(cfg.slots, elevation, torch.full((B,), aug, device=device), cfg.constant_value)
        # batched [uncond; cond]: zero CLIP embedding and zero input latent, same ids (as SVD)
        clip2, concat2, ids2 = torch.cat([torch.zeros_like(clip), clip]), torch.cat([torch.zeros_like(concat), concat]), \
            torch.cat([ids, ids])
        scale = torch.linspace(gmin, gmax, Fr, device=device).view(1, Fr, 1, 1, 1)
        guided = gmax > 1.0 or gmin > 1.0

        def denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
            s = torch.full((B,), sigma, device=device)
            if not guided:
                return edm.denoise(lambda xi, c: unet_forward(self.unet, xi, c, concat, clip, ids), x, s)
            d = edm.denoise(lambda xi, c: unet_forward(self.unet, xi, c, concat2, clip2, ids2),
                            torch.cat([x, x]), torch.cat([s, s]))
            d_u, d_c = d.chunk(2)
            return d_u + scale * (d_c - d_u)

        sigmas = edm.karras_sigmas(steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).tolist()
        x = noise((Fr, 4, H // f, W // f)) * edm.initial_noise_scale(sigmas[0])
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = edm.euler_step(x, denoiser(x, s), s, s_next)
        frames = ((decode_latents(self.vae, x, decode_chunk_size or cfg.decode_chunk_size) + 1) / 2).clamp(0, 1)
        frames[:, 0] = image.to(frames)
        return frames.cpu()

    def __call__(self, image, elevation_deg: float, num_inference_steps: int | None = None,
                 min_guidance: float | None = None, max_guidance: float | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 seeds: Sequence[int] | None = None, noise_aug: float | None = None,
                 decode_chunk_size: int | None = None, assume_white_background: bool = False,
                 radius: float = cameras.DEFAULT_RADIUS) -> OrbitOutput:
        """Image (PIL / array / tensor, RGBA; RGB only with ``assume_white_background``) and elevation in
        degrees -> ``OrbitOutput`` with one orbit per seed (``seeds``) or per generator (default: seed 0)."""
        cfg = self.config
        img = frame_object(image, cfg.resolution, cfg.object_fill, assume_white_background)
        if seeds is not None:
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        elif generator is not None:
            gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        else:
            seeds, gens = [0], [torch.Generator().manual_seed(0)]
        frames = self.generate(img[None].expand(len(gens), -1, -1, -1), float(elevation_deg), gens,
                               num_inference_steps, min_guidance, max_guidance, noise_aug, decode_chunk_size)
        c2w, az, el = cameras.orbit_poses(cfg.num_frames, float(elevation_deg), radius)
        return OrbitOutput(frames, img, c2w, cameras.intrinsics(cfg.resolution, cfg.resolution), az, el,
                           list(seeds) if seeds is not None else None)


def cli(argv: list[str] | None = None) -> int:
    """``python -m hi3d.pipelines.orbit IMAGE --weights DIR --elevation E --out DIR [--seeds 0 1]``: stage 1 only;
    writes one orbit folder per seed (``OUT/seed_<s>/``, the ``hi3d.data.orbit`` layout) and ``OUT/run.json``.
    Seeds whose folder is complete are skipped, so an interrupted run resumes."""
    import argparse

    from hi3d.data.orbit import save_orbit
    from hi3d.pipelines.inputs import load_input
    from hi3d.provenance import RunRecord

    ap = argparse.ArgumentParser(prog="python -m hi3d.pipelines.orbit", description="stage 1: image -> orbit views")
    ap.add_argument("image", help="RGBA cut-out (or RGB on a plain background) image file")
    ap.add_argument("--weights", required=True, help="folder from OrbitPipeline.save_pretrained / convert_checkpoint.py")
    ap.add_argument("--elevation", type=float, required=True, help="camera elevation of the input view, degrees")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: the pipeline config's, 25)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    out = Path(args.out)
    device = torch.device(args.device)
    rec = RunRecord(out, "orbit", config=vars(args), seed=args.seeds[0], device=device)
    todo = [s for s in args.seeds if not (out / f"seed_{s}" / "cameras.json").is_file()]
    if todo:
        with rec.stage("load"):
            pipe = OrbitPipeline.from_pretrained(args.weights, device=device,
                                                 torch_dtype=torch.float16 if device.type == "cuda" else None)
            rgba = load_input(args.image)
        rec.add_weights(args.weights)
        for s in todo:
            with rec.stage(f"sample_seed_{s}"):
                result = pipe(rgba, args.elevation, num_inference_steps=args.steps, seeds=[s])
                save_orbit(result.to_orbit(0), out / f"seed_{s}")
    rec.finish()
    print(f"wrote {len(todo)} orbit(s) to {out} ({len(args.seeds) - len(todo)} already there)")
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(cli())
    except Hi3DError as e:
        print(f"orbit: error: {e}", file=sys.stderr)
        sys.exit(2)
