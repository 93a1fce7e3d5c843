"""The released stage 1's aesthetic score: CLIP ViT-L/14 image embedding -> LAION aesthetic MLP.

The release (``vtdm/encoders.py`` ``AesEmbedder``) fills the first ``added_time_ids`` slot of stage 1 with the
score of the input image, computed by OpenAI's CLIP ViT-L/14 (``clip.load("ViT-L-14.pt")``) and the LAION
"improved aesthetic predictor" MLP (``sac+logos+ava1-l14-linearMSE.pth``); both are stored in the stage-1
checkpoint and converted (``hi3d.models.convert``) into a transformers ``CLIPVisionModelWithProjection`` and
``AestheticMLP``. The release's preprocessing, followed exactly (``AestheticScorer.preprocess``):

1. the middle frame of the video (at inference: the input image), in [-1, 1];
2. bilinear resize (no antialias) to 224 × 384 (H × W) whatever the input size, then columns 80:304
   (a 224² centre crop of the horizontally stretched image);
3. [-1, 1] -> [0, 1], then CLIP's mean/std;
4. image embedding (768) L2-normalised (a zero vector stays zero), then the MLP -> one score.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from hi3d.errors import Hi3DError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MLP_FILE = "aesthetic_mlp.safetensors"
RESIZE_HW, CROP_COLS = (224, 384), (80, 304)


class AestheticMLP(torch.nn.Module):
    """LAION aesthetic head: ``input_size`` -> 1024 -> 128 -> 64 -> 16 -> 1, linear layers only (dropout between
    the first four, inactive at inference); ``layers.{0,2,4,6,7}`` as in the release's state dict."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticScorer(torch.nn.Module):
    """``images [B, 3, H, W]`` in [-1, 1] -> aesthetic scores ``[B]`` (the release's stage-1 slot value)."""

    def __init__(self, clip, mlp: AestheticMLP):
        super().__init__()
        self.clip, self.mlp = clip, mlp
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> CLIP pixel values ``[B, 3, 224, 224]`` as the release makes them."""
        y = F.interpolate(images.float(), size=RESIZE_HW, mode="bilinear", align_corners=False)
        y = y[..., CROP_COLS[0]:CROP_COLS[1]]
        return ((y + 1) * 0.5 - self.mean.to(y.device)) / self.std.to(y.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.clip.parameters())
        emb = self.clip(pixel_values=self.preprocess(images).to(p.device, p.dtype)).image_embeds.float()
        norm = emb.norm(dim=-1, keepdim=True)
        emb = emb / torch.where(norm == 0, torch.ones_like(norm), norm)
        q = next(self.mlp.parameters())
        return self.mlp(emb.to(q.device, q.dtype))[:, 0].float()

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        self.clip.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in self.mlp.state_dict().items()}, str(Path(folder) / MLP_FILE),
                  metadata={"input_size": str(self.mlp.input_size)})

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype=None) -> AestheticScorer:
        from safetensors import safe_open
        from safetensors.torch import load_file
        from transformers import CLIPVisionModelWithProjection

        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / MLP_FILE).is_file():
            raise Hi3DError(f"aesthetic scorer folder {folder} lacks config.json or {MLP_FILE}; re-convert the "
                            "stage-1 checkpoint with scripts/convert_checkpoint.py")
        kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        clip = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, **kw).eval()
        with safe_open(str(folder / MLP_FILE), "pt") as f:
            size = int((f.metadata() or {}).get("input_size", 768))
        mlp = AestheticMLP(size)
        mlp.load_state_dict(load_file(str(folder / MLP_FILE)))
        return cls(clip, mlp.to(dtype=torch_dtype or torch.float32).eval())
