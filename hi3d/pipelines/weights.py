"""The weights folder of ``hi3d generate`` and ``hi3d check-weights DIR``.

```
WEIGHTS/stage1/               OrbitPipeline.save_pretrained: unet/ vae/ image_encoder/ feature_extractor/
                              hi3d_pipeline.json (a converted Hi3D stage-1 checkpoint, or SVD-XT to fine-tune)
WEIGHTS/stage2/               RefinePipeline.save_pretrained: the same + depth/ (transformers depth model,
                              Intel/dpt-hybrid-midas) (a converted Hi3D stage-2 checkpoint)
WEIGHTS/text_to_image/        optional: diffusers Stable Diffusion folder (for --text)
WEIGHTS/background_removal/   optional: transformers image-segmentation model or rembg's u2net.onnx (RGB inputs)
```
``check_weights`` loads every present component on the CPU (the checks a long run would hit first:
missing files, unreadable files, shapes that don't fit the model) and checks that they fit each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from hi3d.errors import Hi3DError

REQUIRED = ("stage1", "stage2")
OPTIONAL = ("text_to_image", "background_removal")


@dataclasses.dataclass
class WeightsReport:
    folder: str
    components: dict[str, str]  # name -> "ok" | "absent (optional)" | error message
    ok: bool


def _load_stage1(path: Path):
    from hi3d.pipelines.orbit import OrbitPipeline

    return OrbitPipeline.from_pretrained(path)


def _load_stage2(path: Path):
    from hi3d.pipelines.refine import RefinePipeline

    return RefinePipeline.from_pretrained(path)


def _load_text_to_image(path: Path):
    from hi3d.pipelines.text_to_image import load_text_to_image

    return load_text_to_image(path)


def _load_background_removal(path: Path):
    import torch

    from hi3d.pipelines.inputs import model_alpha

    return model_alpha(torch.full((32, 32, 3), 0.5), path)  # loads it and runs it once


LOADERS: dict[str, Callable[[Path], object]] = {
    "stage1": _load_stage1, "stage2": _load_stage2,
    "text_to_image": _load_text_to_image, "background_removal": _load_background_removal}


def _explain(name: str, folder: Path, e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, Hi3DError):
        return msg
    if "size mismatch" in str(e) or "shape" in str(e):
        return (f"{folder}: incompatible checkpoint shapes ({msg[:300]}); the files do not match their config.json — "
                f"re-convert with scripts/convert_checkpoint.py or re-download the {name} weights")
    return f"{folder}: cannot load {name} ({type(e).__name__}: {msg[:300]})"


def _compatibility(loaded: dict) -> list[str]:
    """Cross-component checks: the refiner's depth input matches the depth packing, latents match."""
    problems = []
    s1, s2 = loaded.get("stage1"), loaded.get("stage2")
    if s1 is not None and s1.unet.config.in_channels != 8:
        problems.append(f"stage1: UNet takes {s1.unet.config.in_channels} input channels, a stage-1 model takes 8 "
                        "(noisy + input latent) — is this a stage-2 checkpoint in stage1/?")
    if s1 is not None and s2 is not None and s1.unet.config.cross_attention_dim != s2.unet.config.cross_attention_dim:
        problems.append("stage2: its UNet's cross-attention width differs from stage 1's: the two stages come from "
                        "different base models")
    return problems


def check_weights(folder: str | Path, need: tuple[str, ...] = REQUIRED) -> WeightsReport:
    """Load each component under ``folder``; the report says which are fine and why the others are not."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Hi3DError(f"weights folder not found: {folder} (layout: see `hi3d check-weights --help` or the README)")
    components, loaded, ok = {}, {}, True
    for name in REQUIRED + OPTIONAL:
        path = folder / name
        if not path.is_dir():
            required = name in need
            components[name] = (f"missing: {path} (see the README's weights layout)" if required
                                else "absent (optional)")
            ok &= not required
            continue
        try:
            loaded[name] = LOADERS[name](path)
            components[name] = "ok"
        except Exception as e:  # every failure becomes a line of the report
            components[name] = _explain(name, path, e)
            ok = False
    for problem in _compatibility(loaded):
        components[problem.split(":")[0]] = problem
        ok = False
    return WeightsReport(str(folder), components, ok)


def cli(argv: list[str]) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="hi3d check-weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--only", nargs="*", default=list(REQUIRED), help="components that must be present")
    args = p.parse_args(argv)
    report = check_weights(args.folder, tuple(args.only))
    print(json.dumps(dataclasses.asdict(report), indent=2))
    if not report.ok:
        bad = [f"{k}: {v}" for k, v in report.components.items() if v not in ("ok", "absent (optional)")]
        raise Hi3DError("weights folder has problems — " + "; ".join(bad))
    return 0
