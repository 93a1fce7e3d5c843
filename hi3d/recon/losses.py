"""Differentiable image losses of the reconstruction stages (evaluation metrics live in ``hi3d.eval``).

``ssim`` is the SSIM of Wang et al. 2004 with the definition of ``hi3d.eval.metrics.ssim`` (Gaussian
window ``window``² with σ ``sigma``, statistics at every position where the window fits inside the
image, averaged over positions and channels), computed in the input's dtype and device and kept in the
autograd graph, so ``1 - ssim`` is the D-SSIM term of the 3DGS loss. (3DGS zero-pads the window at the
border instead; 'valid' positions keep the loss equal to the metric the views are scored with.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hi3d.eval.metrics import gaussian_window


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per image ``[N]`` of channels-last ``[N, H, W, C]`` (or one ``[H, W, C]`` -> ``[1]``) images
    in ``[0, data_range]``; differentiable in both arguments. Needs ``H, W >= window``."""
    x, y = (t[None] if t.ndim == 3 else t for t in (pred, target))
    if x.shape != y.shape or min(x.shape[1:3]) < window:
        raise ValueError(f"ssim: images {tuple(x.shape)} / {tuple(y.shape)} must match and be >= {window} px")
    x, y = x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2).to(x.dtype)
    C = x.shape[1]
    g = gaussian_window(window, sigma).to(device=x.device, dtype=x.dtype)
    wx, wy = g.view(1, 1, 1, -1).expand(C, 1, 1, -1), g.view(1, 1, -1, 1).expand(C, 1, -1, 1)

    def blur(t):  # separable Gaussian, 'valid' positions
        return F.conv2d(F.conv2d(t, wx, groups=C), wy, groups=C)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.flatten(1).mean(1)
