"""RRDBNet ×4 (ESRGAN's generator, Wang et al. 2018) in plain torch: the paper's appendix "Real-ESRGAN" stage-2
baseline, loading the official ``RealESRGAN_x4plus.pth`` (xinntao/Real-ESRGAN release v0.1.0) from a local file.

Parameter names follow the official checkpoint (``conv_first``, ``body.<i>.rdb<1-3>.conv<1-5>``, ``conv_body``,
``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``); ``RealESRGAN_x4plus`` is ``num_feat=64, num_block=23,
num_grow_ch=32``: 16,697,987 parameters. Nothing is downloaded: a missing file is one error naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hi3d.errors import Hi3DError

REALESRGAN_FILE = "RealESRGAN_x4plus.pth"
REALESRGAN_URL = "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth"


class ResidualDenseBlock(nn.Module):
    """Five 3×3 convs, each seeing the block input and every earlier output; residual scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        for i in range(5):
            out = num_feat if i == 4 else num_grow_ch
            setattr(self, f"conv{i + 1}", nn.Conv2d(num_feat + i * num_grow_ch, out, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, outer residual scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, 3, 4H, 4W]`` (unclamped): conv, ``num_block`` RRDBs + conv with a
    long skip, two nearest ×2 upsamplings each followed by conv + LeakyReLU(0.2), conv + LeakyReLU, conv."""

    def __init__(self, num_feat: int = 64, num_block: int = 23, num_grow_ch: int = 32, num_in_ch: int = 3,
                 num_out_ch: int = 3):
        super().__init__()
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def load_realesrgan(path: str | Path, device: torch.device | str = "cpu") -> RRDBNet:
    """The ×4 RRDBNet of a Real-ESRGAN checkpoint (``params_ema``, else ``params``, else a bare state dict);
    sizes read from the tensors. One-line errors for a missing or mismatching file."""
    path = Path(path)
    if not path.is_file():
        raise Hi3DError(f"stage2=realesrgan needs the official {REALESRGAN_FILE} at {path} (download it from "
                        f"{REALESRGAN_URL}, or set realesrgan_weights=FILE)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("params_ema", ckpt.get("params", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "conv_first.weight" not in state:
        raise Hi3DError(f"{path}: not an RRDBNet checkpoint (no conv_first.weight in params_ema/params)")
    num_block = len({k.split(".")[1] for k in state if k.startswith("body.")})
    model = RRDBNet(num_feat=state["conv_first.weight"].shape[0], num_block=num_block,
                    num_grow_ch=state["body.0.rdb1.conv1.weight"].shape[0],
                    num_in_ch=state["conv_first.weight"].shape[1], num_out_ch=state["conv_last.weight"].shape[0])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise Hi3DError(f"{path}: does not fit RRDBNet ×4 ({str(e).splitlines()[0]})") from None
    return model.eval().to(device)


@torch.no_grad()
def upscale(model: RRDBNet, frames: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """``frames [N, 3, H, W]`` in [0, 1] -> ×4, then (``size``) resized bicubic (antialiased) to ``size``²;
    one frame at a time; clamped to [0, 1], on the frames' device."""
    p = next(model.parameters())
    out = []
    for f in frames:
        y = model(f[None].to(p)).float().clamp(0, 1)
        if size is not None and y.shape[-2:] != (size, size):
            y = F.interpolate(y, size=(size, size), mode="bicubic", align_corners=False,
                              antialias=y.shape[-1] > size).clamp(0, 1)
        out.append(y.to(frames.device))
    return torch.cat(out)
