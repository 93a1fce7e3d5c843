"""Reading user images for image->3D: any PIL-readable file -> straight-alpha RGBA in [0, 1].

Handles EXIF orientation, grayscale (L/LA), palette, 16-bit (I;16, I) and float images. RGBA input keeps
its alpha. RGB input: a background-removal model from a local folder when configured (a transformers
image-segmentation model, e.g. RMBG/BiRefNet saved with ``save_pretrained``), otherwise a plain
background is assumed: its colour is the median of the border pixels and pixels farther than
``threshold`` from it (max over channels) are the object.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from hi3d.errors import Hi3DError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InputConfig:
    background_removal: str | None = None  # local folder of a transformers image-segmentation model
    plain_background_threshold: float = 0.08  # max-channel distance from the border colour, in [0, 1]
    min_object_fraction: float = 0.001  # fewer object pixels than this share of the image -> error


def _to_float_array(im: Image.Image) -> np.ndarray:
    """PIL image of any mode -> float32 ``[H, W, 3|4]`` in [0, 1]."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.float32)
        a = a / (65535.0 if a.max() > 255 else 255.0)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im).astype(np.float32)
        a = a / max(float(a.max()), 1e-8) if a.max() > 1 else a
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return np.asarray(im.convert("RGBA")).astype(np.float32) / 255.0
    return np.asarray(im.convert("RGB")).astype(np.float32) / 255.0


def read_image(path: str | Path) -> torch.Tensor:
    """Image file -> ``[H, W, 3|4]`` float32 in [0, 1], EXIF rotation applied; clear errors."""
    path = Path(path)
    if not path.is_file():
        raise Hi3DError(f"input image not found: {path}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            a = _to_float_array(im)
    except (UnidentifiedImageError, OSError) as e:
        raise Hi3DError(f"cannot read image {path}: {e}") from None
    if a.size == 0 or min(a.shape[:2]) < 8:
        raise Hi3DError(f"{path}: image is empty or smaller than 8x8 pixels")
    return torch.from_numpy(np.ascontiguousarray(a))


def plain_background_alpha(rgb: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``rgb [H, W, 3]`` -> (alpha ``[H, W]`` in {0, 1}, background colour ``[3]``) assuming a plain background."""
    border = torch.cat([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = border.median(dim=0).values
    alpha = ((rgb - bg).abs().amax(dim=-1) > threshold).float()
    return alpha, bg


def segmentation_alpha(rgb: torch.Tensor, folder: str | Path) -> torch.Tensor:
    """Foreground probability ``[H, W]`` from a local transformers image-segmentation model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Hi3DError(f"background-removal model folder not found: {folder} (set inputs.background_removal "
                        "to a local folder saved with save_pretrained, or leave it empty to assume a plain background)")
    from transformers import pipeline

    try:
        seg = pipeline("image-segmentation", model=str(folder), local_files_only=True)
    except Exception as e:
        raise Hi3DError(f"cannot load background-removal model from {folder}: {str(e).splitlines()[0]}") from None
    image = Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8))
    masks = [np.asarray(r["mask"], dtype=np.float32) / 255.0 for r in seg(image)]
    if not masks:
        return torch.zeros(rgb.shape[:2])
    return torch.from_numpy(np.max(masks, axis=0))


def to_rgba(image: torch.Tensor, cfg: InputConfig = InputConfig(), name: str = "input") -> torch.Tensor:
    """``[H, W, 3|4]`` -> straight-alpha RGBA ``[H, W, 4]``; raises ``Hi3DError`` when no object is found."""
    if image.shape[-1] == 4:
        rgba = image.clone()
        if rgba[..., 3].min() > 0.999:  # opaque alpha carries no mask: treat as RGB
            return to_rgba(image[..., :3], cfg, name)
    elif cfg.background_removal:
        rgba = torch.cat([image, segmentation_alpha(image, cfg.background_removal)[..., None]], dim=-1)
    else:
        alpha, bg = plain_background_alpha(image, cfg.plain_background_threshold)
        log.warning("%s has no alpha and no background-removal model is configured: assuming a plain "
                    "background of colour %s", name, [round(float(c), 3) for c in bg])
        rgba = torch.cat([image, alpha[..., None]], dim=-1)
    if float((rgba[..., 3] > 0.5).float().mean()) < cfg.min_object_fraction:
        raise Hi3DError(f"{name}: no object found (the image is empty or all background); give an RGBA cut-out "
                        "or configure inputs.background_removal")
    return rgba


def load_input(path: str | Path, cfg: InputConfig = InputConfig()) -> torch.Tensor:
    """Image file -> straight-alpha RGBA ``[H, W, 4]`` in [0, 1] with the object's mask in alpha."""
    return to_rgba(read_image(path), cfg, name=str(path))
