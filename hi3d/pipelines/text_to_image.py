"""Text -> image of one object on white, with a Stable Diffusion pipeline from a local folder.

The image then goes through ``hi3d.pipelines.inputs.to_rgba`` (plain white background) into image->3D.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hi3d.errors import Hi3DError


@dataclasses.dataclass
class TextToImageConfig:
    prompt_template: str = ("a high-quality 3D render of {prompt}, a single object, centered, full view, "
                            "plain white background")
    negative_prompt: str = "cropped, multiple objects, shadow, cluttered background, text, watermark"
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    resolution: int = 512


def load_text_to_image(folder: str | Path, device: torch.device | str = "cpu"):
    """A diffusers text-to-image pipeline saved with ``save_pretrained`` (e.g. Stable Diffusion 2.1)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise Hi3DError(f"text-to-image weights not found in {folder}: put a diffusers-format Stable Diffusion "
                        "folder there (e.g. stabilityai/stable-diffusion-2-1-base, with model_index.json)")
    from diffusers import AutoPipelineForText2Image

    try:
        pipe = AutoPipelineForText2Image.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                         requires_safety_checker=False)
    except Exception as e:
        raise Hi3DError(f"cannot load the text-to-image pipeline from {folder}: {str(e).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def text_to_image(pipe, prompt: str, cfg: TextToImageConfig, generator: torch.Generator) -> torch.Tensor:
    """RGB ``[H, W, 3]`` float in [0, 1] of the object described by ``prompt``."""
    if not prompt.strip():
        raise Hi3DError("empty text prompt")
    out = pipe(prompt=cfg.prompt_template.format(prompt=prompt), negative_prompt=cfg.negative_prompt,
               num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
               height=cfg.resolution, width=cfg.resolution, generator=generator, output_type="pt")
    return out.images[0].permute(1, 2, 0).float().cpu().clamp(0, 1)
