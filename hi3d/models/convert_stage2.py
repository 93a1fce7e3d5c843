"""The official Hi3D stage-2 checkpoint (generative-models state dict) -> a ``RefinePipeline`` folder.

Same sgm layout and key tables as stage 1 (``hi3d.models.convert``); what differs is the architecture:
the UNet's ``input_blocks.0.0`` takes 17 channels (4 noisy + 9 depth + 4 frame latents) and ``label_emb``
512 features (``[elevation, noise_aug]``) — ``configs/stage2/unet.json``; VAE and image encoder configs
are stage 1's. The depth estimator, MiDaS DPT-Hybrid, is converted from the checkpoint
(``conditioner.embedders.2.model.model.*``) into transformers' ``DPTForDepthEstimation``
(``configs/stage2/depth.json``); ``--depth <folder>`` uses a local transformers DPT folder instead (the
checkpoint's depth tensors are then ignored).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hi3d.errors import Hi3DError
from hi3d.models import convert
from hi3d.models.depth import DepthConfig, DepthEstimator

REPLACED_DEPTH = "MiDaS DPT-Hybrid of the checkpoint: --depth gives the depth model instead"


def default_config_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "stage2"


def build_modules(config_dir: str | Path | None, vae_kind: str, depth: bool = True) -> dict[str, torch.nn.Module]:
    """Empty stage-2 UNet (``config_dir/unet.json``) with the VAE and image encoder configs of ``config_dir`` when
    it has them (``image_encoder.json``, ``vae*.json``), else stage 1's, and, with ``depth``, the DPT-Hybrid of
    ``config_dir/depth.json``."""
    from accelerate import init_empty_weights
    from transformers import DPTConfig, DPTForDepthEstimation

    config_dir = Path(config_dir or default_config_dir())
    base = config_dir if (config_dir / "image_encoder.json").is_file() else convert.default_config_dir()
    modules = convert.build_modules(base, vae_kind, unet_config=config_dir / "unet.json")
    if depth:
        with init_empty_weights():
            modules["depth"] = DPTForDepthEstimation(DPTConfig(**convert.read_config(config_dir / "depth.json")))
    return modules


def convert_stage2_modules(sd: dict[str, torch.Tensor], config_dir: str | Path | None = None, use_ema: bool = False,
                           allow_leftover: bool = False, own_depth: bool = False, checkpoint="checkpoint"):
    """Stage-2 sgm state dict -> (modules, report). The DPT comes from the checkpoint unless ``own_depth``
    (then its tensors are ignored); a one-line error when neither is available."""
    convert.check_sgm(sd, checkpoint)
    conv_in = sd.get(convert.UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] == 8:
        raise Hi3DError(f"{checkpoint}: UNet takes 8 input channels — a stage-1/SVD checkpoint; convert it without --stage 2")
    has_depth = any(k.startswith(convert.DEPTH) for k in sd)
    if not has_depth and not own_depth:
        raise Hi3DError(f"{checkpoint} holds no depth model ('{convert.DEPTH}*'); give a transformers DPT folder "
                        "with --depth")
    depth_keys = {k for k in sd if k.startswith(convert.DEPTH)} if own_depth else set()
    modules = build_modules(config_dir, convert.vae_kind_of(sd), depth=not own_depth)
    report = convert.convert_state_dict({k: v for k, v in sd.items() if k not in depth_keys}, modules, use_ema=use_ema)
    report.ignored.update(dict.fromkeys(sorted(depth_keys), REPLACED_DEPTH))
    convert.check_leftover(report, allow_leftover, str(config_dir or default_config_dir()))
    return modules, report


def convert_stage2(checkpoint: str | Path | None, out: str | Path, depth: DepthEstimator | str | Path | None = None,
                   config_dir: str | Path | None = None, use_ema: bool = False, unsafe_pickle: bool = False,
                   allow_leftover: bool = False, sd: dict[str, torch.Tensor] | None = None):
    """Checkpoint -> ``out`` (unet/ vae/ image_encoder/ feature_extractor/ depth/ hi3d_pipeline.json).
    ``depth``: None (the checkpoint's DPT-Hybrid), a ``DepthEstimator`` or a local DPT folder. ``sd`` may be
    given directly (tests)."""
    from transformers import CLIPImageProcessor

    from hi3d.models.stage2 import Stage2Components, Stage2Config, in_channels
    from hi3d.models.svd import save_stage_folder

    sd = convert.read_checkpoint(checkpoint, unsafe_pickle) if sd is None else sd
    if isinstance(depth, (str, Path)):
        depth = DepthEstimator.from_pretrained(DepthConfig(pretrained=str(depth)))
    modules, report = convert_stage2_modules(sd, config_dir, use_ema, allow_leftover, depth is not None, checkpoint)
    if depth is None:  # MiDaS takes [-1, 1] input: mean = std = 0.5 on [0, 1] images
        dpt = modules["depth"].eval()
        depth = DepthEstimator(dpt, DepthConfig(kind="dpt", input_size=dpt.config.image_size))
    unet = modules["unet"]
    cfg = Stage2Config(num_frames=unet.config.num_frames, resolution=8 * (unet.config.sample_size or 128),
                       depth=DepthConfig(kind=depth.cfg.kind, input_size=depth.cfg.input_size,
                                         packing="unshuffle" if unet.config.in_channels == 17 else "resize"))
    if unet.config.in_channels != in_channels(cfg):
        raise Hi3DError(f"UNet takes {unet.config.in_channels} input channels; stage 2 expects 17 (unshuffled depth) "
                        "or 9 (resized depth)")
    fe_path = convert.default_config_dir() / "feature_extractor.json"
    fe_cfg = convert.read_config(fe_path) if fe_path.is_file() else {}
    components = Stage2Components(unet, modules["vae"], modules["image_encoder"].eval(), CLIPImageProcessor(**fe_cfg),
                                  depth)
    save_stage_folder(out, vars(components), cfg)
    return report


def cli(argv: list[str] | None = None) -> int:
    from hi3d.provenance import RunRecord

    ap = argparse.ArgumentParser(prog="convert_checkpoint.py --stage 2", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="official stage-2 checkpoint (.pt DeepSpeed, .ckpt or .safetensors)")
    ap.add_argument("--out", required=True, help="output folder (loadable by RefinePipeline.from_pretrained)")
    ap.add_argument("--depth", default=None, help="local transformers DPT folder to use instead of the checkpoint's "
                    "MiDaS DPT-Hybrid (default: convert the checkpoint's)")
    ap.add_argument("--config-dir", default=None, help="folder with the stage-2 unet.json and depth.json "
                    "(default configs/stage2)")
    ap.add_argument("--ema", action="store_true", help="convert the UNet's EMA weights (model_ema.*; an error when "
                    "the checkpoint has none, as the released ones)")
    ap.add_argument("--unsafe-pickle", action="store_true", help="allow full pickle loading (trusted files only)")
    ap.add_argument("--allow-leftover", action="store_true", help="do not fail on unconverted tensors")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rec = RunRecord(out, "convert_checkpoint_stage2", config=vars(args), seed=None, device=torch.device("cpu"))
    with rec.stage("convert") as entry:
        report = convert_stage2(args.checkpoint, out, args.depth, args.config_dir, args.ema, args.unsafe_pickle,
                                args.allow_leftover)
        entry.update(convert.report_entry(report))
    rec.add_weights(out)
    rec.finish()
    convert.print_report(report, out)
    return 0
