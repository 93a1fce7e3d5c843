"""``OrbitPipeline``: one image + a camera elevation -> an orbit of ``num_frames`` views and their cameras
(stage 1 inference, paper §4.2).

The shared sampler (``hi3d.models.sampler``, through ``VideoDiffusionPipeline``): Euler EDM, 25 steps, Karras σ
from σ_max = 700, started from noise; classifier-free guidance rising linearly over the frames (1.0 -> 2.5;
unconditional = zero CLIP embedding and zero input latent, as SVD); input noise-augmented with strength
0.02; frame 0 of the output is the sampled one, as the release's (``replace_first_frame`` pastes the input).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from hi3d import cameras
from hi3d.errors import Hi3DError
from hi3d.models import sampler
from hi3d.models.conditioning import added_time_ids
from hi3d.models.stage1 import Stage1Components, Stage1Config, load_stage1
from hi3d.models.svd import clip_embed, encode_condition
from hi3d.pipelines.base import VideoDiffusionPipeline
from hi3d.pipelines.preprocess import frame_object


@dataclasses.dataclass
class OrbitOutput:
    """frames ``[S, F, 3, H, W]`` float32 in [0, 1] (S samples; frame 0 sampled, or ``image`` with
    ``replace_first_frame``); image ``[3, H, W]``
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


class OrbitPipeline(VideoDiffusionPipeline):
    """Stage-1 sampler over components (diffusers style): ``OrbitPipeline(unet, vae, image_encoder,
    feature_extractor, config, aesthetic=None)``, ``from_pretrained(folder)``, ``save_pretrained(folder)``,
    ``to(device)``. ``aesthetic`` (optional): see ``Stage1Components.aesthetic``."""

    components_class = Stage1Components
    config_class = Stage1Config
    load_components = staticmethod(load_stage1)

    def __init__(self, unet, vae, image_encoder, feature_extractor, config: Stage1Config | None = None,
                 aesthetic: torch.nn.Module | None = None):
        super().__init__(config, unet=unet, vae=vae, image_encoder=image_encoder,
                         feature_extractor=feature_extractor, aesthetic=aesthetic)

    def aesthetic_score(self, x_m11: torch.Tensor) -> torch.Tensor:
        """Value of the ``"aesthetic"``/``"constant"`` slot for input images ``[B, 3, H, W]`` in [-1, 1]: the
        aesthetic predictor's score when there is one, the layout has an ``"aesthetic"`` slot and
        ``config.aesthetic == "predictor"``, else the configured ``constant_value``. ``[B]``."""
        B = x_m11.shape[0]
        if self.config.aesthetic not in ("predictor", "fixed"):
            raise Hi3DError(f"aesthetic='{self.config.aesthetic}' is not one of: predictor, fixed")
        if self.aesthetic is None or "aesthetic" not in self.config.slots or self.config.aesthetic == "fixed":
            return torch.full((B,), float(self.config.constant_value), device=x_m11.device)
        return self.aesthetic(x_m11).reshape(B).to(x_m11.device, torch.float32)

    @torch.no_grad()
    def generate(self, image: torch.Tensor, elevation: torch.Tensor | float,
                 generators: torch.Generator | Sequence[torch.Generator] | None = None,
                 num_inference_steps: int | None = None, min_guidance: float | None = None,
                 max_guidance: float | None = None, noise_aug: float | None = None,
                 decode_chunk_size: int | None = None) -> torch.Tensor:
        """Core sampler on prepared inputs: ``image [B, 3, H, W]`` in [0, 1] (white background, H, W the
        output size), ``elevation [B]`` degrees. One generator per video (its noise depends only on it), or
        one for the batch. Returns ``[B, F, 3, H, W]`` in [0, 1]; frame 0 is the sampled one (the release's)
        unless ``replace_first_frame``."""
        cfg = self.config
        aug = cfg.noise_aug if noise_aug is None else noise_aug
        device = self.device
        B = image.shape[0]
        gens = sampler.video_generators(generators, B)
        x_m11 = image.to(device, torch.float32) * 2 - 1
        with self.placement.use(self.image_encoder):
            clip = clip_embed(self.image_encoder, self.feature_extractor, x_m11).float()
        with self.placement.use(self.vae):
            cond = encode_condition(self.vae, x_m11 + aug * sampler.batch_randn(gens, x_m11.shape[1:], device)).float()
        concat = cond.unsqueeze(1).expand(-1, cfg.num_frames, -1, -1, -1)
        elevation = torch.as_tensor(elevation, dtype=torch.float32, device=device).reshape(-1).expand(B)
        with self.placement.use(self.aesthetic):
            score = self.aesthetic_score(x_m11)
        ids = added_time_ids(cfg.slots, elevation, torch.full((B,), aug, device=device), score)
        with self.placement.use(self.unet):
            x = self.sample_latents(concat, clip, ids, gens, num_inference_steps or cfg.num_inference_steps,
                                    cfg.min_guidance if min_guidance is None else min_guidance,
                                    cfg.max_guidance if max_guidance is None else max_guidance)
        with self.placement.use(self.vae):
            frames = self.decode(x, decode_chunk_size or cfg.decode_chunk_size)
        if cfg.replace_first_frame:
            frames[:, 0] = image.to(frames)
        return frames.cpu()

    def __call__(self, image, elevation_deg: float, num_inference_steps: int | None = None,
                 min_guidance: float | None = None, max_guidance: float | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 seeds: Sequence[int] | None = None, noise_aug: float | None = None,
                 decode_chunk_size: int | None = None, assume_white_background: bool = False,
                 radius: float = cameras.DEFAULT_RADIUS, framing: str = "release") -> OrbitOutput:
        """Image (PIL / array / tensor, RGBA; RGB only with ``assume_white_background``) and elevation in
        degrees -> ``OrbitOutput`` with one orbit per seed (``seeds``) or per generator (default: seed 0).
        ``framing``: ``hi3d.pipelines.preprocess`` (``refit`` fills ``config.object_fill``); an image already
        framed at the resolution passes unchanged with the default ``release``."""
        cfg = self.config
        img = frame_object(image, cfg.resolution, framing, cfg.object_fill, assume_white_background)
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
