import pytest
import torch
import torch.nn.functional as F

from hi3d.errors import Hi3DError
from hi3d.models.depth import (
    DepthConfig,
    DepthEstimator,
    depth_channels,
    normalise_per_frame,
    pack_depth,
    tiny_depth_estimator,
)


def test_min_max_normalisation_per_frame():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(3, 10, 12, generator=g) * torch.tensor([1.0, 50.0, 0.01]).view(3, 1, 1)
    n = normalise_per_frame(d)
    torch.testing.assert_close(n.flatten(1).min(1).values, torch.zeros(3))
    torch.testing.assert_close(n.flatten(1).max(1).values, torch.ones(3))
    torch.testing.assert_close(normalise_per_frame(d * 7 + 3), n)  # invariant to affine depth scale/shift
    assert normalise_per_frame(torch.full((1, 4, 4), 2.0)).abs().max() == 0


def test_packing_unshuffle_and_resize():
    d = torch.rand(2, 48, 48)
    cfg = DepthConfig(packing="unshuffle")
    packed = pack_depth(d, (16, 16), cfg)
    assert packed.shape == (2, 9, 16, 16) and depth_channels(cfg) == 9
    # pixel-unshuffle keeps every value of the 3h x 3w map: shuffling back gives the map normalised to [0, 1]
    torch.testing.assert_close(F.pixel_shuffle(packed, 3)[:, 0], normalise_per_frame(d))
    flat = pack_depth(d, (16, 16), DepthConfig(packing="resize"))
    assert flat.shape == (2, 1, 16, 16)
    # a ramp linear in x, shrunk 3x bilinearly without antialias: samples at 3i + 1 (half-pixel centres), then
    # min-max normalised: exactly i / 15
    ramp = ((torch.arange(48) + 0.5) / 48).expand(1, 48, 48) * 5 + 2
    small = pack_depth(ramp, (16, 16), DepthConfig(packing="resize"))[0, 0]
    torch.testing.assert_close(small, (torch.arange(16) / 15).expand(16, 16), atol=1e-6, rtol=0)
    with pytest.raises(Hi3DError, match="packing"):
        pack_depth(d, (16, 16), DepthConfig(packing="bogus"))


@pytest.mark.parametrize("hybrid", [True, False])
def test_tiny_dpt_estimator_shapes_range_and_per_frame(hybrid):
    est = tiny_depth_estimator(DepthConfig(input_size=32), seed=1, hybrid=hybrid)
    frames = torch.rand(2, 3, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    out = est(frames, (10, 10))
    assert out.shape == (2, 3, 9, 10, 10)
    assert out.min() >= 0 and out.max() <= 1
    # each frame normalised on its own (after the resize to the packing grid): spans [0, 1] in every frame
    full = F.pixel_shuffle(out.flatten(0, 1), 3)
    torch.testing.assert_close(full.flatten(1).max(1).values, torch.ones(6))
    torch.testing.assert_close(full.flatten(1).min(1).values, torch.zeros(6))
    # a frame's depth does not depend on the other frames
    torch.testing.assert_close(est(frames[:1, 1:2], (10, 10))[0, 0], out[0, 1], atol=1e-5, rtol=0)


def test_save_and_load_roundtrip(tmp_path):
    est = tiny_depth_estimator(DepthConfig(input_size=32), seed=3)
    est.save_pretrained(tmp_path / "dpt")
    loaded = DepthEstimator.from_pretrained(DepthConfig(pretrained=str(tmp_path / "dpt"), input_size=32))
    frames = torch.rand(1, 2, 3, 32, 32)
    torch.testing.assert_close(loaded(frames, (8, 8)), est(frames, (8, 8)))


def test_missing_folder_names_what_to_download(tmp_path):
    with pytest.raises(Hi3DError, match="Intel/dpt-hybrid-midas"):
        DepthEstimator.from_pretrained(DepthConfig(pretrained=str(tmp_path / "nope")))
    with pytest.raises(Hi3DError, match="Depth-Anything"):
        DepthEstimator.from_pretrained(DepthConfig(pretrained=None, kind="depth_anything"))
