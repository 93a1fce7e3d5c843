import pytest
import torch

from hi3d.errors import Hi3DError
from hi3d.models.rrdbnet import RRDBNet, load_realesrgan, upscale


def test_paper_size_matches_the_official_realesrgan_x4plus_layout():
    """RealESRGAN_x4plus.pth (params_ema): 16,697,987 parameters; 23 RRDBs of 3 dense blocks of 5 convs."""
    with torch.device("meta"):
        state = RRDBNet().state_dict()
    assert sum(t.numel() for t in state.values()) == 16_697_987
    assert len(state) == 2 * (1 + 23 * 3 * 5 + 5)
    shapes = {"conv_first.weight": (64, 3, 3, 3), "body.0.rdb1.conv1.weight": (32, 64, 3, 3),
              "body.22.rdb3.conv4.weight": (32, 160, 3, 3), "body.22.rdb3.conv5.weight": (64, 192, 3, 3),
              "conv_body.weight": (64, 64, 3, 3), "conv_up1.weight": (64, 64, 3, 3), "conv_up2.bias": (64,),
              "conv_hr.weight": (64, 64, 3, 3), "conv_last.weight": (3, 64, 3, 3)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def tiny_checkpoint(path, key="params_ema"):
    g = torch.Generator().manual_seed(0)
    model = RRDBNet(num_feat=8, num_block=2, num_grow_ch=32)  # spandrel fixes the growth at 32
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.state_dict().items()}
    torch.save({key: state}, path)
    return state


def test_tiny_forward_equals_spandrel_esrgan(tmp_path):
    """Another library's ESRGAN (spandrel, detecting the architecture from the official key layout) on the
    same tiny checkpoint gives the same ×4 output."""
    spandrel = pytest.importorskip("spandrel")
    path = tmp_path / "tiny.pth"
    tiny_checkpoint(path)
    ours = load_realesrgan(path)
    ref = spandrel.ModelLoader().load_from_file(path)
    assert ref.scale == 4
    x = torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, y_ref = ours(x), ref.model.eval()(x)
    assert y.shape == (2, 3, 24, 28)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    up = upscale(ours, x, size=16)
    assert up.shape == (2, 3, 16, 16) and up.min() >= 0 and up.max() <= 1


def test_missing_or_wrong_file_is_one_line(tmp_path):
    with pytest.raises(Hi3DError, match="RealESRGAN_x4plus.pth at .*nothere.pth") as e:
        load_realesrgan(tmp_path / "nothere.pth")
    assert "\n" not in str(e.value)
    torch.save({"params_ema": {"foo": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(Hi3DError, match="not an RRDBNet checkpoint"):
        load_realesrgan(tmp_path / "bad.pth")
    state = tiny_checkpoint(tmp_path / "cut.pth", key="params")
    del state["conv_hr.bias"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(Hi3DError, match="does not fit RRDBNet"):
        load_realesrgan(tmp_path / "cut.pth")
