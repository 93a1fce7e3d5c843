import numpy as np
import pytest
import torch
from PIL import Image

from hi3d.errors import Hi3DError
from hi3d.pipelines.inputs import InputConfig, load_input


def _object_rgb(h=40, w=60):
    a = np.full((h, w, 3), 255, np.uint8)
    a[10:30, 20:35] = (200, 30, 40)
    return a


def test_rgba_keeps_alpha(tmp_path):
    a = np.zeros((40, 60, 4), np.uint8)
    a[10:30, 20:35] = (10, 200, 30, 255)
    Image.fromarray(a).save(tmp_path / "x.png")
    rgba = load_input(tmp_path / "x.png")
    assert rgba.shape == (40, 60, 4)
    assert rgba[..., 3].sum() == 20 * 15


def test_rgb_plain_background_assumed(tmp_path, caplog):
    Image.fromarray(_object_rgb()).save(tmp_path / "x.jpg", quality=95)
    with caplog.at_level("WARNING"):
        rgba = load_input(tmp_path / "x.jpg")
    assert "assuming a plain background" in caplog.text
    mask = rgba[..., 3] > 0.5
    assert abs(int(mask.sum()) - 300) < 30 and mask[20, 27] and not mask[2, 2]


def test_grayscale_and_16bit(tmp_path):
    g = _object_rgb()[..., 0]
    Image.fromarray(g).convert("L").save(tmp_path / "g.png")
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    a, b = load_input(tmp_path / "g.png"), load_input(tmp_path / "g16.png")
    assert a.shape == b.shape == (40, 60, 4)
    torch.testing.assert_close(a, b, atol=1 / 255, rtol=0)
    assert a[20, 27, 0] == pytest.approx(200 / 255, abs=1e-3)


def test_exif_rotation_applied(tmp_path):
    im = Image.fromarray(_object_rgb())
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    assert load_input(tmp_path / "r.jpg").shape[:2] == (60, 40)


@pytest.mark.parametrize("kind, match", [
    ("blank", "no object found"), ("transparent", "no object found"), ("missing", "not found"),
    ("garbage", "cannot read image"), ("tiny", "smaller than 8x8")])
def test_bad_inputs_clear_errors(tmp_path, kind, match):
    p = tmp_path / "in.png"
    if kind == "blank":
        Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(p)
    elif kind == "transparent":
        Image.fromarray(np.zeros((40, 40, 4), np.uint8)).save(p)
    elif kind == "garbage":
        p.write_bytes(b"not an image")
    elif kind == "tiny":
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p)
    with pytest.raises(Hi3DError, match=match):
        load_input(p)


def test_missing_background_model_folder(tmp_path):
    Image.fromarray(_object_rgb()).save(tmp_path / "x.png")
    with pytest.raises(Hi3DError, match="background-removal model folder not found"):
        load_input(tmp_path / "x.png", InputConfig(background_removal=str(tmp_path / "nope")))
