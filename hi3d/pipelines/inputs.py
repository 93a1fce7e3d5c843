"""Reading user images for image->3D: any PIL-readable file -> straight-alpha RGBA in [0, 1].

Handles EXIF orientation, grayscale (L/LA), palette, 16-bit (I;16, I) and float images. RGBA input keeps
its alpha. RGB input, by ``inputs.background_removal``:

- a background-removal model from local files: a transformers image-segmentation folder
  (``save_pretrained``; the union of its non-background labels is the object) or rembg's U²-Net ONNX
  (``u2net.onnx``, or a folder holding one ``.onnx``; run by onnxruntime with rembg's pre/post-processing,
  what the release, InstantMesh and Wonder3D use);
- none: a plain background is assumed and checked. Its colour is the median of the border pixels; only
  background *connected to the image border* is removed (flood fill), so white parts inside the object
  stay opaque. The colour tolerance is measured per image from the border: ``2.5 x`` the median border
  distance (about the 99th percentile for Gaussian noise), at least 8/255. The floor was chosen on the
  release's demo images (``../shared/inputs``: clean white, median border distance 0) and their JPEG (q75)
  copies: on the PNGs the object area moves < 0.1 % between 4/255 and 8/255 (-0.65 % at 16/255, as
  near-white parts start to go); on the JPEGs a 2/255 floor turns the ringing round the object into
  object (+2 to +6 % area), 8/255 keeps it within 1.4 % of the PNG's. A border whose median distance puts
  the tolerance above 0.1, or fewer than half of the border pixels within it, is not a plain background:
  refused with the fix (a model folder or an RGBA input). Trade-off: real holes through the object
  (a mug's handle) stay opaque too; give an RGBA cut-out or a model for those.
  The edge is soft (alpha = colour distance / the nearby object's distance, 2 px band), and object specks
  smaller than 0.1 % of the largest object part are removed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from hi3d.errors import Hi3DError

log = logging.getLogger(__name__)

FIX = ("set inputs.background_removal to a local background-removal model (a transformers image-segmentation "
       "folder or rembg's u2net.onnx), or give an RGBA cut-out")
TOLERANCE_FLOOR = 8 / 255  # colour tolerance of a noise-free plain background (max over channels)
TOLERANCE_MAX = 0.1  # a border noisier than this is not a plain background
NOISE_TO_TOLERANCE = 2.5  # tolerance / median border distance
SPECK_FRACTION = 1e-3  # object parts smaller than this share of the largest part are specks
EDGE_BAND = 2  # px: width of the soft edge on the object side


@dataclasses.dataclass
class InputConfig:
    background_removal: str | None = None  # local model: transformers image-segmentation folder or u2net .onnx
    framing: str = "release"  # release: shorter side resized, centre crop (the release) | refit: object re-framed
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


def _border(a: np.ndarray) -> np.ndarray:
    """The one-pixel image border of ``a [H, W, ...]`` -> ``[2H + 2W, ...]``."""
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def plain_background_alpha(rgb: torch.Tensor, name: str = "input") -> tuple[torch.Tensor, dict]:
    """``rgb [H, W, 3]`` in [0, 1] on a plain background -> (alpha ``[H, W]`` in [0, 1], info with the
    background ``colour`` and the colour ``tolerance``). Raises ``Hi3DError`` when the border is not one
    plain colour. Background = pixels within the tolerance of the border colour (max over channels) that
    are 4-connected to the image border; everything else is object."""
    a = rgb.numpy().astype(np.float32)
    bg = np.median(_border(a), axis=0)
    dist = np.abs(a - bg).max(-1)  # [H, W]
    border = _border(dist)
    tol = max(TOLERANCE_FLOOR, NOISE_TO_TOLERANCE * float(np.median(border)))
    share = float((border <= tol).mean())
    if tol > TOLERANCE_MAX or share < 0.5:
        raise Hi3DError(f"{name}: no alpha and the background is not one plain colour (border colour "
                        f"{[round(float(c), 3) for c in bg]}, {share:.0%} of the border within {tol:.3f}); {FIX}")
    labels, _ = ndimage.label(dist <= tol)  # 4-connected: a diagonal outline stops the fill
    touching = np.unique(_border(labels))
    obj = ~np.isin(labels, touching[touching > 0])
    parts, n = ndimage.label(obj, structure=np.ones((3, 3)))
    if n:
        sizes = np.bincount(parts.ravel())[1:]
        obj &= np.isin(parts, 1 + np.nonzero(sizes >= SPECK_FRACTION * sizes.max())[0])
    # soft edge: alpha = distance / the distance of the object just inside (its colour against the background)
    inner = ndimage.binary_erosion(obj, iterations=EDGE_BAND)
    near = ndimage.maximum_filter(np.where(inner, dist, 0), size=2 * EDGE_BAND + 3)
    band = obj & ~inner
    alpha = obj.astype(np.float32)
    alpha[band] = np.where(near[band] > 0, np.clip(dist[band] / np.maximum(near[band], 1e-6), 0, 1), 1)
    return torch.from_numpy(alpha), {"colour": [round(float(c), 4) for c in bg], "tolerance": round(tol, 4)}


@functools.lru_cache(maxsize=2)
def _segmentation_pipeline(folder: str):
    from transformers import pipeline

    try:
        return pipeline("image-segmentation", model=folder, local_files_only=True)
    except Exception as e:
        raise Hi3DError(f"cannot load background-removal model from {folder}: {str(e).splitlines()[0]}") from None


def segmentation_alpha(rgb: torch.Tensor, folder: str | Path) -> torch.Tensor:
    """Foreground ``[H, W]`` in [0, 1] from a local transformers image-segmentation model: the union of the
    masks of every label that is not a background label (name containing "background")."""
    image = Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8))
    masks = [np.asarray(r["mask"], dtype=np.float32) / 255.0 for r in _segmentation_pipeline(str(folder))(image)
             if "background" not in str(r.get("label", "")).lower()]
    if not masks:
        return torch.zeros(rgb.shape[:2])
    return torch.from_numpy(np.max(masks, axis=0))


@functools.lru_cache(maxsize=2)
def _onnx_session(path: str):
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise Hi3DError(f"cannot load background-removal model {path}: {str(e).splitlines()[0]}") from None


U2NET_SIZE = 320  # rembg's U²-Net input side
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def u2net_alpha(rgb: torch.Tensor, path: str | Path) -> torch.Tensor:
    """Foreground ``[H, W]`` in [0, 1] from rembg's U²-Net ONNX with rembg's processing: Lanczos resize to
    320², divide by the image maximum, ImageNet mean/std; the first output's channel 0 min-max normalised,
    truncated to 8 bits and Lanczos-resized back."""
    session = _onnx_session(str(path))
    image = Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8))
    x = np.asarray(image.resize((U2NET_SIZE, U2NET_SIZE), Image.Resampling.LANCZOS)).astype(np.float64)
    x = (x / max(float(x.max()), 1e-6) - IMAGENET_MEAN) / IMAGENET_STD
    pred = session.run(None, {session.get_inputs()[0].name: x.transpose(2, 0, 1)[None].astype(np.float32)})[0][0, 0]
    pred = (pred - pred.min()) / max(float(pred.max() - pred.min()), 1e-12)
    mask = Image.fromarray((pred * 255).astype(np.uint8), mode="L").resize(image.size, Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def model_alpha(rgb: torch.Tensor, model: str | Path) -> torch.Tensor:
    """Foreground ``[H, W]`` from the background-removal model at ``model``: a transformers folder
    (``config.json``), else an ``.onnx`` file or a folder holding exactly one (U²-Net)."""
    model = Path(model)
    if model.is_dir() and (model / "config.json").is_file():
        return segmentation_alpha(rgb, model)
    onnx = [model] if model.is_file() and model.suffix == ".onnx" else sorted(model.glob("*.onnx")) if model.is_dir() else []
    if len(onnx) == 1:
        return u2net_alpha(rgb, onnx[0])
    what = ("not found" if not model.exists() else f"holds {len(onnx)} .onnx files" if onnx
            else "is neither an .onnx model nor a transformers folder")
    raise Hi3DError(f"background-removal model folder {what}: {model} (set inputs.background_removal to a transformers "
                    "image-segmentation folder saved with save_pretrained or to rembg's u2net.onnx, or leave it empty "
                    "to assume a plain background)")


def to_rgba(image: torch.Tensor, cfg: InputConfig = InputConfig(), name: str = "input") -> torch.Tensor:
    """``[H, W, 3|4]`` -> straight-alpha RGBA ``[H, W, 4]``; raises ``Hi3DError`` when no object is found."""
    if image.shape[-1] == 4:
        rgba = image.clone()
        if rgba[..., 3].min() > 0.999:  # opaque alpha carries no mask: treat as RGB
            return to_rgba(image[..., :3], cfg, name)
    elif cfg.background_removal:
        rgba = torch.cat([image, model_alpha(image, cfg.background_removal)[..., None]], dim=-1)
    else:
        alpha, info = plain_background_alpha(image, name)
        log.info("%s has no alpha: plain background of colour %s removed (tolerance %.4f)", name, info["colour"],
                 info["tolerance"])
        rgba = torch.cat([image, alpha[..., None]], dim=-1)
    if float((rgba[..., 3] > 0.5).float().mean()) < cfg.min_object_fraction:
        raise Hi3DError(f"{name}: no object found (the image is empty or all background); give an RGBA cut-out "
                        "or configure inputs.background_removal")
    return rgba


def load_input(path: str | Path, cfg: InputConfig = InputConfig()) -> torch.Tensor:
    """Image file -> straight-alpha RGBA ``[H, W, 4]`` in [0, 1] with the object's mask in alpha."""
    return to_rgba(read_image(path), cfg, name=str(path))
