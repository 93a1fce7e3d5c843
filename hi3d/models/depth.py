"""Monocular depth of video frames for the stage-2 refiner (paper §4.3: MiDaS DPT-Hybrid).

``DepthEstimator`` wraps a transformers depth model (``DPTForDepthEstimation``, the MiDaS DPT-Hybrid
architecture, or Depth Anything through ``AutoModelForDepthEstimation``) loaded from a local folder only.
As the release's ``DepthEmbedder`` (``vtdm/encoders.py``): frames resized bilinearly without antialias (and
not clamped) to ``input_size`` (the release's int(H / 2.6666 / 32)·32 = 384 for 1024² frames), the model's
relative depth (MiDaS predicts inverse depth: near = large) resized bilinearly to the packing grid, min-max
normalised per frame into [0, 1], then packed to the latent grid ``h × w``:

- ``"unshuffle"`` (released Hi3D): map at ``3h × 3w`` (384² for 1024² frames), pixel-unshuffle 3×3
  -> 9 channels at ``h × w``;
- ``"resize"``: map at ``h × w``, 1 channel.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from hi3d.errors import Hi3DError

REPOS = {"dpt": "Intel/dpt-hybrid-midas", "depth_anything": "depth-anything/Depth-Anything-V2-Small-hf"}


@dataclasses.dataclass
class DepthConfig:
    pretrained: str | None = None
    """Local transformers-format folder (config.json + model.safetensors [+ preprocessor_config.json])."""
    kind: str = "dpt"
    """dpt (MiDaS DPT-Hybrid, the paper's) | depth_anything — only names what to download in errors."""
    input_size: int = 384
    """Frames are resized to this square size for the depth model (DPT-Hybrid: 384; the release takes
    int(H / 2.6666 / 32)·32 of the frame size H, 384 at the paper's 1024)."""
    packing: str = "unshuffle"
    """unshuffle (3x3 pixel-unshuffle -> 9 channels, released) | resize (1 channel)."""
    unshuffle: int = 3


def depth_channels(cfg: DepthConfig) -> int:
    """Channels of the packed depth: ``unshuffle²`` or 1."""
    if cfg.packing == "unshuffle":
        return cfg.unshuffle ** 2
    if cfg.packing == "resize":
        return 1
    raise Hi3DError(f"depth packing '{cfg.packing}' is not one of: unshuffle, resize")


def normalise_per_frame(depth: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise each map of ``depth [N, H, W]`` to [0, 1] (a constant map -> 0)."""
    flat = depth.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1), flat.max(1).values.view(-1, 1, 1)
    return (depth - lo) / (hi - lo).clamp(min=eps)


def pack_depth(depth: torch.Tensor, latent_hw: tuple[int, int], cfg: DepthConfig) -> torch.Tensor:
    """Raw depth maps ``[N, H, W]`` -> ``[N, depth_channels, h, w]`` in [0, 1]: bilinear resize (no antialias) to
    ``(r·h, r·w)`` (r = ``unshuffle``; 1 for ``"resize"``), min-max normalisation per map, pixel-unshuffle r×r."""
    h, w = latent_hw
    r = cfg.unshuffle if depth_channels(cfg) > 1 else 1
    d = F.interpolate(depth[:, None].float(), size=(h * r, w * r), mode="bilinear", align_corners=False)
    d = normalise_per_frame(d[:, 0])[:, None]
    return F.pixel_unshuffle(d, r) if r > 1 else d


def missing_depth_error(folder, kind: str, what: str) -> Hi3DError:
    repo = REPOS.get(kind, REPOS["dpt"])
    return Hi3DError(
        f"depth model {what}. Download {repo} in transformers format (config.json, model.safetensors, "
        f"preprocessor_config.json; e.g. `huggingface-cli download {repo} --local-dir {folder or 'weights/dpt-hybrid-midas'}` "
        "on a machine with internet) and point `depth.pretrained=` at that folder")


class DepthEstimator(torch.nn.Module):
    """Frames -> packed, per-frame-normalised depth. ``model`` is a transformers depth model whose forward
    takes ``pixel_values`` and returns ``predicted_depth [N, H', W']``."""

    def __init__(self, model: torch.nn.Module, cfg: DepthConfig = DepthConfig(),
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5)):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> int:
        return depth_channels(self.cfg)

    @classmethod
    def from_pretrained(cls, cfg: DepthConfig, torch_dtype=None) -> DepthEstimator:
        """Load ``cfg.pretrained`` (local only; mean/std from its ``preprocessor_config.json`` if present)."""
        folder = cfg.pretrained
        if folder is None:
            raise missing_depth_error(None, cfg.kind, "folder not set")
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise missing_depth_error(folder, cfg.kind, f"folder {folder} not found or has no config.json")
        from transformers import AutoModelForDepthEstimation

        kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        try:
            model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True, **kw)
        except (OSError, ValueError) as e:
            raise missing_depth_error(folder, cfg.kind, f"in {folder} cannot be read ({str(e).splitlines()[0]})") \
                from None
        pre = folder / "preprocessor_config.json"
        stats = json.loads(pre.read_text()) if pre.is_file() else {}
        return cls(model.eval(), cfg, tuple(stats.get("image_mean", (0.5,) * 3)), tuple(stats.get("image_std", (0.5,) * 3)))

    def save_pretrained(self, folder: str | Path) -> None:
        from hi3d.io import write_json

        self.model.save_pretrained(folder)
        write_json(Path(folder) / "preprocessor_config.json",
                   {"image_mean": self.mean.flatten().tolist(), "image_std": self.std.flatten().tolist(),
                    "size": {"height": self.cfg.input_size, "width": self.cfg.input_size}})

    @torch.no_grad()
    def predict(self, images: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Raw model output ``[N, H', W']`` for ``images [N, 3, H, W]`` nominally in [0, 1] (noise-augmented frames
        may leave it; not clamped), resized bilinearly without antialias to ``input_size`` s."""
        p = next(self.model.parameters())
        s = self.cfg.input_size
        out = []
        for i in range(0, images.shape[0], chunk):
            x = images[i:i + chunk].to(p.device, torch.float32)
            if x.shape[-2:] != (s, s):
                x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
            x = ((x - self.mean.to(x.device)) / self.std.to(x.device)).to(p.dtype)
            out.append(self.model(pixel_values=x).predicted_depth.float())
        return torch.cat(out)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """``frames [B, F, 3, H, W]`` in [0, 1] -> packed depth ``[B, F, channels, h, w]`` in [0, 1]."""
        B, Fr = frames.shape[:2]
        return pack_depth(self.predict(frames.flatten(0, 1)), latent_hw, self.cfg).unflatten(0, (B, Fr))


def tiny_depth_estimator(cfg: DepthConfig = DepthConfig(input_size=32), seed: int = 0,
                         hybrid: bool = True) -> DepthEstimator:
    """A tiny randomly initialised DPT (transformers ``DPTConfig``) for tests and CPU runs: hybrid (BiT
    conv stem + ViT, the DPT-Hybrid/MiDaS layout) by default, else the plain ViT DPT."""
    from transformers import DPTConfig, DPTForDepthEstimation

    from hi3d.models.svd import init_weights_

    common = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                  image_size=cfg.input_size, fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3],
                  use_auxiliary_head=False)
    if hybrid:
        backbone = {"model_type": "bit", "global_padding": "same", "layer_type": "bottleneck", "depths": [1, 1, 1],
                    "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True,
                    "hidden_sizes": [8, 16, 32], "num_groups": 2, "embedding_size": 8}
        config = DPTConfig(**common, patch_size=16, is_hybrid=True, backbone_config=backbone,
                           neck_hidden_sizes=[8, 16, 32, 32], reassemble_factors=[1, 1, 1, 0.5],
                           backbone_featmap_shape=[1, 32, cfg.input_size // 16, cfg.input_size // 16])
    else:
        config = DPTConfig(**common, patch_size=8, neck_hidden_sizes=[8, 16, 16, 32], reassemble_factors=[4, 2, 1, 0.5])
    model = DPTForDepthEstimation(config)
    init_weights_(model, torch.Generator().manual_seed(seed))
    return DepthEstimator(model.eval(), cfg)
