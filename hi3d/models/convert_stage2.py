"""The official Hi3D stage-2 checkpoint (generative-models state dict) -> a ``RefinePipeline`` folder.

Same sgm layout and key tables as stage 1 (``hi3d.models.convert``); what differs is the architecture:
the UNet's ``input_blocks.0.0`` takes 17 channels (4 noisy + 9 depth + 4 frame latents) and ``label_emb``
512 features (``[elevation, noise_aug]``) — ``configs/stage2/unet.json``; VAE and image encoder configs
are stage 1's. The depth estimator (MiDaS DPT-Hybrid) is not taken from the checkpoint: it is copied
from a local transformers-format folder (``--depth``); conditioner tensors of a depth embedder, if the
checkpoint carries any, are ignored (``DEPTH_IGNORED``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from hi3d.errors import Hi3DError
from hi3d.models import convert
from hi3d.models.depth import DepthConfig, DepthEstimator

DEPTH_IGNORED = [r"conditioner\.embedders\.\d+\.(midas|depth_model|depth_estimator|depth)\."]


def default_config_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "stage2"


def build_modules(config_dir: str | Path | None, vae_kind: str) -> dict[str, torch.nn.Module]:
    """Empty stage-2 UNet (``config_dir/unet.json``) with stage 1's VAE and image encoder configs."""
    config_dir = Path(config_dir or default_config_dir())
    tmp = convert.build_modules(convert.default_config_dir(), vae_kind)
    from accelerate import init_empty_weights
    from diffusers import UNetSpatioTemporalConditionModel

    cfg = {k: v for k, v in json.loads((config_dir / "unet.json").read_text()).items() if not k.startswith("_")}
    with init_empty_weights():
        tmp["unet"] = UNetSpatioTemporalConditionModel.from_config(cfg)
    return tmp


def convert_stage2(checkpoint: str | Path | None, out: str | Path, depth: DepthEstimator | str | Path,
                   config_dir: str | Path | None = None, use_ema: bool = False, unsafe_pickle: bool = False,
                   allow_leftover: bool = False, sd: dict[str, torch.Tensor] | None = None,
                   modules: dict[str, torch.nn.Module] | None = None):
    """Checkpoint -> ``out`` (unet/ vae/ image_encoder/ feature_extractor/ depth/ hi3d_pipeline.json).
    ``depth``: a ``DepthEstimator`` or a local DPT folder. ``sd``/``modules`` may be given directly (tests)."""
    from transformers import CLIPImageProcessor

    from hi3d.models.stage2 import Stage2Config, in_channels
    from hi3d.pipelines.refine import RefinePipeline

    sd = convert.read_checkpoint(checkpoint, unsafe_pickle) if sd is None else sd
    if not any(k.startswith(convert.UNET) for k in sd):
        raise Hi3DError(f"{checkpoint}: no '{convert.UNET}*' keys — not a generative-models (sgm) diffusion checkpoint")
    conv_in = sd.get(convert.UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] == 8:
        raise Hi3DError(f"{checkpoint}: UNet takes 8 input channels — a stage-1/SVD checkpoint; convert it without --stage 2")
    if isinstance(depth, (str, Path)):
        depth = DepthEstimator.from_pretrained(DepthConfig(pretrained=str(depth)))
    modules = modules or build_modules(config_dir, convert.vae_kind_of(sd))
    depth_keys = [k for k in sd if any(re.match(p, k) for p in DEPTH_IGNORED)]
    report = convert.convert_state_dict({k: v for k, v in sd.items() if k not in set(depth_keys)}, modules,
                                        use_ema=use_ema)
    report.ignored += len(depth_keys)
    if report.leftover and not allow_leftover:
        raise Hi3DError(f"{len(report.leftover)} checkpoint tensors were not converted, e.g. {report.leftover[:5]}; "
                        "check configs/stage2/unet.json or pass --allow-leftover")
    unet = modules["unet"]
    cfg = Stage2Config(num_frames=unet.config.num_frames, resolution=8 * (unet.config.sample_size or 128),
                       depth=DepthConfig(kind=depth.cfg.kind, input_size=depth.cfg.input_size,
                                         packing="unshuffle" if unet.config.in_channels == 17 else "resize"))
    if unet.config.in_channels != in_channels(cfg):
        raise Hi3DError(f"UNet takes {unet.config.in_channels} input channels; stage 2 expects 17 (unshuffled depth) "
                        "or 9 (resized depth)")
    fe_path = convert.default_config_dir() / "feature_extractor.json"
    fe_cfg = {k: v for k, v in json.loads(fe_path.read_text()).items() if not k.startswith("_")} \
        if fe_path.is_file() else {}
    RefinePipeline(unet, modules["vae"], modules["image_encoder"].eval(), CLIPImageProcessor(**fe_cfg), depth,
                   cfg).save_pretrained(out)
    return report


def cli(argv: list[str] | None = None) -> int:
    from hi3d.provenance import RunRecord

    ap = argparse.ArgumentParser(prog="convert_checkpoint.py --stage 2", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="official stage-2 checkpoint (.pt DeepSpeed, .ckpt or .safetensors)")
    ap.add_argument("--out", required=True, help="output folder (loadable by RefinePipeline.from_pretrained)")
    ap.add_argument("--depth", required=True, help="local transformers-format Intel/dpt-hybrid-midas folder")
    ap.add_argument("--config-dir", default=None, help="folder with the stage-2 unet.json (default configs/stage2)")
    ap.add_argument("--ema", action="store_true", help="convert the EMA weights of the UNet when present")
    ap.add_argument("--unsafe-pickle", action="store_true", help="allow full pickle loading (trusted files only)")
    ap.add_argument("--allow-leftover", action="store_true", help="do not fail on unconverted tensors")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rec = RunRecord(out, "convert_checkpoint_stage2", config=vars(args), seed=None, device=torch.device("cpu"))
    with rec.stage("convert") as entry:
        report = convert_stage2(args.checkpoint, out, args.depth, args.config_dir, args.ema, args.unsafe_pickle,
                                args.allow_leftover)
        entry.update(mapped=report.mapped, ignored=report.ignored, leftover=report.leftover, filled=report.filled)
    rec.add_weights(out)
    rec.finish()
    print(f"converted {report.mapped} tensors ({report.ignored} known-unneeded ignored, {len(report.leftover)} "
          f"left over, defaults for {report.filled or 'none'}) -> {out}")
    return 0
