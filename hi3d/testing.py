"""Tiny randomly initialised components for tests and CPU benchmarks (the diffusers way)."""

from __future__ import annotations

from pathlib import Path

import torch


def _byte_level_vocab() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 2 * len(chars), "<|endoftext|>": 2 * len(chars) + 1})
    return vocab


def tiny_clip_tokenizer(max_length: int = 77):
    """A byte-level CLIP tokenizer with no merges (514 tokens)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=max_length)


def tiny_text_to_image_pipeline(seed: int = 0):
    """A Stable Diffusion pipeline with a few channels (32-px latents -> 64-px images when asked)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    g = torch.Generator().manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=16))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    for module in (text_encoder, unet, vae):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 if p.ndim > 1 else p)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_text_to_image(folder: str | Path, seed: int = 0) -> Path:
    tiny_text_to_image_pipeline(seed).save_pretrained(folder)
    return Path(folder)


def save_tiny_weights(folder: str | Path, num_frames: int = 4, resolution: int = 32, steps: int = 2,
                      seed: int = 0, text_to_image: bool = True) -> Path:
    """A complete ``hi3d generate`` weights folder of tiny random models (stage 1 at ``resolution``,
    stage 2 at twice that, its tiny DPT depth model, and optionally a tiny Stable Diffusion)."""
    from hi3d.models import stage1, stage2
    from hi3d.pipelines.orbit import OrbitPipeline
    from hi3d.pipelines.refine import RefinePipeline

    folder = Path(folder)
    tiny1 = stage1.TinyConfig(enabled=True, seed=seed)
    c1 = stage1.Stage1Config(num_frames=num_frames, resolution=resolution, num_inference_steps=steps, tiny=tiny1)
    OrbitPipeline.from_components(stage1.tiny_components(c1), c1).save_pretrained(folder / "stage1")
    tiny2 = stage1.TinyConfig(enabled=True, seed=seed + 1)
    c2 = stage2.Stage2Config(num_frames=num_frames, resolution=2 * resolution, num_inference_steps=steps, tiny=tiny2)
    c2.depth.input_size = 32
    RefinePipeline.from_components(stage2.tiny_components(c2), c2).save_pretrained(folder / "stage2")
    if text_to_image:
        save_tiny_text_to_image(folder / "text_to_image", seed)
    return folder


def shared_dir() -> Path:
    """The project's shared read-only data: ``$HI3D_SHARED``, else ``<repo root>/../shared``."""
    import os

    return Path(os.environ.get("HI3D_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")


def release_keys(stage: int) -> dict[str, list[int]]:
    """``{key: shape}`` of every tensor of the released Hi3D stage-``stage`` checkpoint (``release-keys/`` in the
    shared folder, read from the release's own module tree). Raises ``FileNotFoundError`` when absent."""
    import json

    path = shared_dir() / "release-keys" / f"stage{stage}.json"
    return {k: v["shape"] for k, v in json.loads(path.read_text())["keys"].items()}


def meta_state_dict(keys: dict[str, list[int]], dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Shape-only (meta-device) tensors for ``keys`` (the released files store float16)."""
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in keys.items()}


class TinyU2Net(torch.nn.Module):
    """A stand-in for rembg's U²-Net: one 5×5 conv, outputs (d0, d1) sigmoid maps ``[1, 1, H, W]`` like U²-Net's."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 1, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()

    def forward(self, x):
        y = self.conv(x)
        return torch.sigmoid(y), torch.sigmoid(-y)


def save_tiny_u2net(path: str | Path, seed: int = 0) -> TinyU2Net:
    """Export ``TinyU2Net`` to ONNX at ``path`` (input ``[1, 3, 320, 320]``, rembg's layout); returns the net."""
    import warnings

    net = TinyU2Net(seed).eval()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: needs no onnxscript
        torch.onnx.export(net, (torch.randn(1, 3, 320, 320),), str(path), dynamo=False, input_names=["input.1"],
                          output_names=["d0", "d1"])
    return net
