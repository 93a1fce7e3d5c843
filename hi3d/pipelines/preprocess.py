"""Input image -> the square image stage 1 sees, on white, by one of two framings (``inputs.framing``):

- ``release`` (default; what the released weights were used with, ``pipeline_i2v_eval_v01.py``): the image
  composited on white, its shorter side resized to the resolution (bilinear, no antialias, sizes rounded
  up), centre crop; the object is not re-framed. Use it with the released weights and inputs like the
  release's demo images (object centred, filling most of a square picture).
- ``refit``: the object's box (alpha > 0.5) cropped, its longer side scaled to ``object_fill`` of the image,
  centred. Use it for objects that are small, off-centre or cut by the crop (a long panorama), and with
  weights trained on hi3d's own renders. Framing measured on our orbit cameras (r = 1.5, FOV 49.1°,
  unit-cube objects; projected silhouette box, longer side / image side, 16 views × elevations −10…40°):
  bunny 0.67–0.95 (mean 0.83), spider 0.58–0.89 (0.72), Wuson 0.38–0.76 (0.57) -> ``object_fill`` 0.75.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hi3d.errors import Hi3DError


def to_tensor_image(image) -> torch.Tensor:
    """PIL image, numpy array or tensor ``[H, W, C]`` / ``[C, H, W]`` (C = 3 or 4, float in [0, 1] or uint8)
    -> float32 ``[H, W, C]`` in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        image = np.asarray(image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB"))
    t = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if t.ndim != 3:
        raise Hi3DError(f"input image must be [H, W, C] or [C, H, W], got shape {tuple(t.shape)}")
    if t.shape[0] in (3, 4) and t.shape[-1] not in (3, 4):
        t = t.permute(1, 2, 0)
    if t.shape[-1] not in (3, 4):
        raise Hi3DError(f"input image must have 3 (RGB) or 4 (RGBA) channels, got {t.shape[-1]}")
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    return t.clamp(0, 1)


FRAMINGS = ("release", "refit")


def frame_object(image, resolution: int, framing: str = "release", object_fill: float = 0.75,
                 assume_white_background: bool = False, alpha_threshold: float = 0.5,
                 with_mask: bool = False) -> torch.Tensor:
    """RGBA (or white-background RGB) image -> ``[3, resolution, resolution]`` float in [0, 1] on white
    (``with_mask``: ``[4, R, R]``, the framed alpha in channel 3), framed by ``framing`` (module docstring).

    ``refit`` scales with antialiased bilinear on premultiplied alpha. RGB input is refused unless
    ``assume_white_background`` (the object is then the non-white pixels).
    """
    if framing not in FRAMINGS:
        raise Hi3DError(f"inputs.framing='{framing}' is not one of {', '.join(FRAMINGS)}")
    img = to_tensor_image(image)
    if img.shape[-1] == 3:
        if not assume_white_background:
            raise Hi3DError("stage 1 expects a cut-out object: give an RGBA image (alpha = object mask), e.g. "
                            "from `hi3d.pipelines.inputs.load_input`, or pass assume_white_background=True for an "
                            "RGB image whose background is already white")
        alpha = ((1.0 - img).amax(-1) > 0.04).float()
        img = torch.cat([img, alpha[..., None]], -1)
        img[..., :3] = torch.where(alpha[..., None] > 0, img[..., :3], torch.ones_like(img[..., :3]))
    if not (img[..., 3] > alpha_threshold).any():
        raise Hi3DError("input image has no object pixels (alpha is empty)")
    out = _release_framing(img, resolution) if framing == "release" else _refit(img, resolution, object_fill,
                                                                                   alpha_threshold)
    return out if with_mask else out[:3]


def _release_framing(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """``[H, W, 4]`` straight RGBA -> ``[4, R, R]``: on white, shorter side to R (bilinear, no antialias,
    ``ceil`` sizes), centre crop at ``round((size - R) / 2)``, as the release."""
    h, w = img.shape[:2]
    a = img[..., 3:]
    x = torch.cat([img[..., :3] * a + (1 - a), a], -1).permute(2, 0, 1)[None]
    rate = max(resolution * 1.0 / h, resolution * 1.0 / w)
    nh, nw = math.ceil(h * rate), math.ceil(w * rate)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False).clamp(0, 1)
    top, left = int(round((nh - resolution) / 2.0)), int(round((nw - resolution) / 2.0))
    return x[0, :, top:top + resolution, left:left + resolution]


def _refit(img: torch.Tensor, resolution: int, object_fill: float, alpha_threshold: float) -> torch.Tensor:
    """``[H, W, 4]`` straight RGBA -> ``[4, R, R]``: object box's longer side ``object_fill·R``, centred."""
    ys, xs = torch.nonzero(img[..., 3] > alpha_threshold, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    crop = img[y0:y1, x0:x1]
    h, w = crop.shape[:2]
    scale = object_fill * resolution / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    rgb, a = crop[..., :3], crop[..., 3:]
    pre = torch.cat([rgb * a, a], -1).permute(2, 0, 1)[None]  # premultiplied [1, 4, h, w]
    pre = F.interpolate(pre, (nh, nw), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
    canvas = torch.zeros(4, resolution, resolution)
    top, left = (resolution - nh) // 2, (resolution - nw) // 2
    canvas[:, top:top + nh, left:left + nw] = pre
    return torch.cat([(canvas[:3] + (1.0 - canvas[3:])).clamp(0, 1), canvas[3:]])  # premultiplied over white
