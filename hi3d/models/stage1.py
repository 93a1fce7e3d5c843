"""Stage 1, the orbit generator: SVD (image-to-video) fine-tuned to turn one image + a camera elevation
into a 16-frame orbit (paper §4.2).

Conditions (as the released Hi3D stage-1 model): CLIP embedding of the input -> cross-attention; the VAE
latent of the noise-augmented input concatenated to every noisy frame latent (conv_in 4 + 4); elevation
through an ``added_time_ids`` slot (``hi3d.models.conditioning``). Objective: EDM with v-prediction
(``hi3d.models.edm``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from hi3d.errors import Hi3DError
from hi3d.models.conditioning import (
    SVD_SLOTS,
    adapt_added_time_projection,
    check_slots,
    install_slot_projection,
)
from hi3d.models.svd import PIPELINE_FILE, init_weights_, match_sgm_norm_eps

SVD_REPO = "stabilityai/stable-video-diffusion-img2vid-xt"
SUBFOLDERS = ("unet", "vae", "image_encoder", "feature_extractor")


@dataclasses.dataclass
class TinyConfig:
    """Tiny randomly initialised components for tests and CPU runs (used when ``enabled``)."""
    enabled: bool = False
    seed: int = 0
    unet_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64])
    unet_heads: list[int] = dataclasses.field(default_factory=lambda: [2, 4])
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    vae_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 32, 32])  # 3 levels: /4 latents
    clip_hidden: int = 32
    clip_layers: int = 2
    clip_image_size: int = 32


@dataclasses.dataclass
class VideoDiffusionConfig:
    """Settings shared by both SVD-based stages: model layout, EDM objective and Euler EDM sampling."""
    pretrained: str | None = None  # local diffusers-format SVD(-XT) or a converted/saved stage folder; None with tiny
    num_frames: int = 16
    resolution: int = 512
    slots: list[str] = dataclasses.field(default_factory=lambda: ["constant", "elevation", "noise_aug"])
    constant_value: float = 0.0  # value of the "constant" (or "aesthetic") slot
    P_mean: float = 1.0  # ln σ ~ N(P_mean, P_std²), one σ per video
    P_std: float = 1.6
    noise_aug_mean: float = -3.0  # training: strength = exp(N(mean, std²))
    noise_aug_std: float = 0.5
    cond_dropout: float = 0.1  # each condition zeroed independently with this probability
    gradient_checkpointing: bool = False
    trainable_params: list[str] = dataclasses.field(default_factory=list)  # name substrings; [] = all UNet
    vae_encode_chunk: int = 16
    # sampling (validation and pipeline defaults)
    num_inference_steps: int = 25
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    rho: float = 7.0
    min_guidance: float = 1.0
    max_guidance: float = 2.5
    noise_aug: float = 0.02
    decode_chunk_size: int = 8
    replace_first_frame: bool = False
    """Frame 0 of the output = the input image (the release: stage 1 keeps its sampled frame 0, stage 2 pastes)."""
    tiny: TinyConfig = dataclasses.field(default_factory=TinyConfig)


@dataclasses.dataclass
class Stage1Config(VideoDiffusionConfig):
    """Model, objective and sampling settings of stage 1 (paper values by default)."""
    time_ids_init: str = "keep"  # from SVD: "keep" its 3-slot projection (release) or "by_name" (new slots = 0)
    object_fill: float = 0.75  # preprocessing: longer side of the object's box / image side
    aesthetic: str = "predictor"
    """Value of an ``"aesthetic"`` slot: ``predictor`` (the release: the score of each input image by the folder's
    ``aesthetic/`` CLIP ViT-L/14 + LAION MLP, ``hi3d.models.aesthetic``; ``constant_value`` when the folder has
    none) | ``fixed`` (``constant_value`` for every input)."""


@dataclasses.dataclass
class Stage1Components:
    unet: torch.nn.Module  # diffusers UNetSpatioTemporalConditionModel
    vae: torch.nn.Module  # diffusers AutoencoderKLTemporalDecoder (or AutoencoderKL: image decoder)
    image_encoder: torch.nn.Module  # transformers CLIPVisionModelWithProjection
    feature_extractor: object  # transformers CLIPImageProcessor (mean/std used)
    aesthetic: torch.nn.Module | None = None
    """Optional aesthetic predictor for the ``"aesthetic"`` slot: input image ``[B, 3, H, W]`` in [-1, 1] (it does
    its own CLIP preprocessing) -> score ``[B]``; absent: the fixed ``constant_value``."""


def tiny_components(cfg: Stage1Config = Stage1Config()) -> Stage1Components:
    """Tiny random components (seeded by ``cfg.tiny.seed``) with the layout of ``cfg``: conv_in 8 -> 4,
    ``len(cfg.slots)`` 256-d time-id slots, CLIP projection = cross-attention width."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    t = cfg.tiny
    check_slots(cfg.slots)
    n = len(t.unet_channels)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=None, in_channels=8, out_channels=4, block_out_channels=tuple(t.unet_channels),
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * (n - 1) + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * (n - 1),
        num_attention_heads=tuple(t.unet_heads), layers_per_block=t.layers_per_block,
        cross_attention_dim=t.cross_attention_dim, addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=256 * len(cfg.slots), num_frames=cfg.num_frames)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=tuple(t.vae_channels), down_block_types=("DownEncoderBlock2D",) * len(t.vae_channels),
        layers_per_block=1, latent_channels=4)
    clip_cfg = CLIPVisionConfig(hidden_size=t.clip_hidden, intermediate_size=2 * t.clip_hidden,
                                projection_dim=t.cross_attention_dim, num_hidden_layers=t.clip_layers,
                                num_attention_heads=2, image_size=t.clip_image_size, patch_size=8)
    image_encoder = CLIPVisionModelWithProjection(clip_cfg)
    fe = CLIPImageProcessor(size={"shortest_edge": t.clip_image_size},
                            crop_size={"height": t.clip_image_size, "width": t.clip_image_size})
    g = torch.Generator().manual_seed(t.seed)
    for m in (unet, vae, image_encoder):
        init_weights_(m, g)
    install_slot_projection(unet, cfg.slots)
    match_sgm_norm_eps(unet)
    return Stage1Components(unet, vae, image_encoder.eval(), fe)


def missing_weights_error(folder: str | Path | None, what: str) -> Hi3DError:
    return Hi3DError(
        f"stage-1 weights {what}. Download {SVD_REPO} in diffusers format (e.g. `huggingface-cli download "
        f"{SVD_REPO} --local-dir {folder or 'weights/svd-xt'}` on a machine with internet) or convert the Hi3D "
        "stage-1 checkpoint with `scripts/convert_checkpoint.py`, then point `pretrained=` (or --weights) at that "
        "folder; it needs the subfolders " + ", ".join(f"{s}/" for s in SUBFOLDERS))


def load_stage1(folder: str | Path | None, cfg: Stage1Config = Stage1Config(), torch_dtype=None) -> Stage1Components:
    """Components from a local diffusers-format folder (SVD/SVD-XT, or one saved by ``OrbitPipeline``).

    The UNet's added-time projection is adapted to ``cfg.slots``: a folder saved by us records its slots in
    ``hi3d_pipeline.json``; any other folder is taken as SVD (``[fps, motion_bucket, noise_aug]``).
    """
    if folder is None:
        raise missing_weights_error(None, "folder not set")
    folder = Path(folder)
    if not folder.is_dir():
        raise missing_weights_error(folder, f"folder not found: {folder}")
    missing = [s for s in SUBFOLDERS if not (folder / s / ("preprocessor_config.json" if s == "feature_extractor"
                                                          else "config.json")).is_file()]
    if missing:
        raise missing_weights_error(folder, f"folder {folder} is incomplete (missing {', '.join(missing)})")
    from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    vae_class = json.loads((folder / "vae" / "config.json").read_text()).get("_class_name")
    vae_cls = AutoencoderKL if vae_class == "AutoencoderKL" else AutoencoderKLTemporalDecoder
    try:
        unet = UNetSpatioTemporalConditionModel.from_pretrained(folder / "unet", **kw)
        vae = vae_cls.from_pretrained(folder / "vae", **kw)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", **kw)
        fe = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
    except (OSError, ValueError) as e:
        raise missing_weights_error(folder, f"in {folder} cannot be read ({str(e).splitlines()[0]})") from None
    meta = folder / PIPELINE_FILE
    source_slots = json.loads(meta.read_text())["slots"] if meta.is_file() else list(SVD_SLOTS)
    adapt_added_time_projection(unet, source_slots, cfg.slots, cfg.time_ids_init)
    install_slot_projection(unet, cfg.slots)
    match_sgm_norm_eps(unet)
    aesthetic = None
    if (folder / "aesthetic").is_dir():  # written by the checkpoint converter: the release's aesthetic scorer
        from hi3d.models.aesthetic import AestheticScorer

        aesthetic = AestheticScorer.from_pretrained(folder / "aesthetic", torch_dtype=torch_dtype)
    return Stage1Components(unet, vae, image_encoder.eval(), fe, aesthetic)


def build_components(cfg: Stage1Config) -> Stage1Components:
    """Tiny random components when ``cfg.tiny.enabled``, else ``load_stage1(cfg.pretrained)``."""
    return tiny_components(cfg) if cfg.tiny.enabled else load_stage1(cfg.pretrained, cfg)
