import pytest
import torch

from hi3d.errors import Hi3DError
from hi3d.pipelines.text_to_image import TextToImageConfig, load_text_to_image, text_to_image
from hi3d.testing import save_tiny_text_to_image


def test_tiny_text_to_image_from_local_folder_is_seeded(tmp_path):
    pipe = load_text_to_image(save_tiny_text_to_image(tmp_path / "sd"))
    cfg = TextToImageConfig(num_inference_steps=2, resolution=32)
    a = text_to_image(pipe, "a red chair", cfg, torch.Generator().manual_seed(0))
    b = text_to_image(pipe, "a red chair", cfg, torch.Generator().manual_seed(0))
    c = text_to_image(pipe, "a red chair", cfg, torch.Generator().manual_seed(1))
    assert a.shape == (32, 32, 3) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_missing_text_to_image_weights(tmp_path):
    with pytest.raises(Hi3DError, match="text-to-image weights not found"):
        load_text_to_image(tmp_path)
