import dataclasses

import pytest
import torch

from hi3d import cameras
from hi3d.errors import Hi3DError
from hi3d.models.stage1 import Stage1Config, TinyConfig, tiny_components
from hi3d.pipelines.orbit import OrbitPipeline
from hi3d.pipelines.preprocess import frame_object


@pytest.fixture(scope="module")
def pipe():
    cfg = Stage1Config(num_frames=3, resolution=32, num_inference_steps=2, tiny=TinyConfig(enabled=True))
    return OrbitPipeline.from_components(tiny_components(cfg), cfg)


def rgba_disc(size=48, radius=10, centre=(14, 30)) -> torch.Tensor:
    """An off-centre red disc with alpha on a transparent (black) background, [H, W, 4]."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    a = (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) < radius ** 2).float()
    return torch.stack([a, 0.2 * a, 0.1 * a, a], -1)


def test_preprocess_centres_scales_on_white():
    img = frame_object(rgba_disc(), 64, "refit", object_fill=0.75)
    assert img.shape == (3, 64, 64) and img.min() >= 0 and img.max() <= 1
    obj = (img - 1).abs().amax(0) > 0.5
    ys, xs = torch.nonzero(obj, as_tuple=True)
    assert (ys.max() - ys.min() + 1) / 64 == pytest.approx(0.75, abs=0.05)
    assert (ys.float().mean() + 0.5) == pytest.approx(32, abs=1.0) and (xs.float().mean() + 0.5) == pytest.approx(32, abs=1.0)
    assert torch.equal(img[:, 0, 0], torch.ones(3))  # white background
    assert img[0, 32, 32] == pytest.approx(1.0, abs=0.02) and img[1, 32, 32] == pytest.approx(0.2, abs=0.02)


def test_rgb_input_needs_alpha_or_white_background():
    rgb = torch.ones(40, 40, 3)
    rgb[10:20, 10:30] = torch.tensor([0.1, 0.5, 0.9])
    with pytest.raises(Hi3DError, match="RGBA"):
        frame_object(rgb, 32)
    img = frame_object(rgb, 32, "refit", object_fill=0.5, assume_white_background=True)
    ys, xs = torch.nonzero((img - 1).abs().amax(0) > 0.3, as_tuple=True)
    assert (xs.max() - xs.min() + 1) == 16  # longer side (20 px) scaled to 0.5 · 32


def test_frame0_kept_as_sampled_and_cameras(pipe):
    """Row 8 of issue 13: the release's stage 1 (``pipeline_i2v_eval_v01.py``) returns its sampled frame 0; only
    ``replace_first_frame=True`` pastes the input, leaving the other frames unchanged."""
    out = pipe(rgba_disc(), elevation_deg=20.0, seeds=[0])
    assert out.frames.shape == (1, 3, 3, 32, 32)
    assert not pipe.config.replace_first_frame
    assert (out.frames[0, 0] - out.image).abs().max() > 0.05
    pasted = OrbitPipeline(pipe.unet, pipe.vae, pipe.image_encoder, pipe.feature_extractor,
                           dataclasses.replace(pipe.config, replace_first_frame=True))(rgba_disc(), 20.0, seeds=[0])
    assert torch.equal(pasted.frames[0, 0], out.image) and torch.equal(pasted.frames[0, 1:], out.frames[0, 1:])
    assert torch.equal(out.image, frame_object(rgba_disc(), 32))
    assert out.c2w.shape == (3, 4, 4) and torch.allclose(out.elevation_deg, torch.full((3,), 20.0, dtype=torch.float64))
    _, el, r = cameras.azimuth_elevation_radius(out.c2w)
    assert torch.allclose(el, torch.full((3,), 20.0, dtype=torch.float64))
    assert torch.allclose(r, torch.full((3,), 1.5, dtype=torch.float64))
    assert torch.allclose(out.K, cameras.intrinsics(32, 32))
    orbit = out.to_orbit(0)
    assert orbit.rgba.shape == (3, 32, 32, 4) and torch.equal(orbit.rgba[0, ..., :3], out.frames[0, 0].permute(1, 2, 0))
    assert torch.allclose(orbit.radius, torch.full((3,), 1.5, dtype=torch.float64))


def test_seeds_determine_frames(pipe):
    a = pipe(rgba_disc(), 10.0, seeds=[1, 2]).frames
    b = pipe(rgba_disc(), 10.0, seeds=[1]).frames
    assert torch.allclose(a[0], b[0], atol=2e-4)  # a sample depends on its seed, not on the batch
    assert (a[0, 1:] - a[1, 1:]).abs().max() > 1e-3  # different seeds -> different frames
    c = pipe(rgba_disc(), 10.0, generator=torch.Generator().manual_seed(1)).frames
    assert torch.equal(c[0], b[0])


def test_guidance_and_elevation_change_the_output(pipe):
    base = pipe(rgba_disc(), 10.0, seeds=[3]).frames
    unguided = pipe(rgba_disc(), 10.0, seeds=[3], min_guidance=1.0, max_guidance=1.0).frames
    other = pipe(rgba_disc(), 35.0, seeds=[3]).frames
    assert (base[0, 2] - unguided[0, 2]).abs().max() > 1e-4
    assert (base[0, 1:] - other[0, 1:]).abs().max() > 1e-4


def test_save_from_pretrained_round_trip(pipe, tmp_path):
    pipe.config.constant_value = 1.5  # a non-default config value must survive the round trip
    try:
        pipe.save_pretrained(tmp_path / "model")
        loaded = OrbitPipeline.from_pretrained(tmp_path / "model")
        assert loaded.config.constant_value == 1.5 and loaded.config.num_frames == 3
        a = pipe(rgba_disc(), 15.0, seeds=[4]).frames
        b = loaded(rgba_disc(), 15.0, seeds=[4]).frames
        assert torch.equal(a, b)
    finally:
        pipe.config.constant_value = 0.0
    pipe.save_pretrained(tmp_path / "model")  # overwriting an existing folder works
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["model"]


@pytest.mark.weights
def test_real_weights_folder_samples():
    """With HI3D_STAGE1_WEIGHTS=<SVD-XT or converted Hi3D folder>: a 2-step orbit at 256² runs end to end."""
    import os

    folder = os.environ.get("HI3D_STAGE1_WEIGHTS")
    if not folder or not os.path.isdir(folder):
        pytest.skip("set HI3D_STAGE1_WEIGHTS to a diffusers-format stage-1/SVD folder")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = OrbitPipeline.from_pretrained(folder, torch_dtype=torch.float16 if device == "cuda" else None, device=device)
    pipe.config.resolution, pipe.config.num_frames = 256, 4
    out = pipe(rgba_disc(), 20.0, num_inference_steps=2, seeds=[0], decode_chunk_size=4)
    assert out.frames.shape == (1, 4, 3, 256, 256) and torch.isfinite(out.frames).all()
    assert torch.equal(out.frames[0, 0], out.image)


def test_image_decoder_vae_runs(pipe):
    """The Hi3D release's first stage is SVD's per-frame image decoder (diffusers AutoencoderKL)."""
    from diffusers import AutoencoderKL

    from hi3d.models.svd import init_weights_

    vae = AutoencoderKL(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4)
    init_weights_(vae, torch.Generator().manual_seed(0))
    other = OrbitPipeline(pipe.unet, vae, pipe.image_encoder, pipe.feature_extractor, pipe.config)
    out = other(rgba_disc(), 5.0, seeds=[0])
    assert out.frames.shape == (1, 3, 3, 32, 32) and torch.isfinite(out.frames).all()
    assert (out.frames - pipe(rgba_disc(), 5.0, seeds=[0]).frames).abs().max() > 1e-3


def test_stage1_command_writes_orbits_and_resumes(pipe, tmp_path):
    from hi3d.data.orbit import load_orbit
    from hi3d.io import load_png, read_json, save_png
    from hi3d.pipelines.orbit import cli

    pipe.save_pretrained(tmp_path / "w")
    save_png(tmp_path / "in.png", rgba_disc())
    argv = [str(tmp_path / "in.png"), "--weights", str(tmp_path / "w"), "--elevation", "15", "--out",
            str(tmp_path / "out"), "--seeds", "0", "1", "--device", "cpu"]
    assert cli(argv) == 0
    orbit = load_orbit(tmp_path / "out" / "seed_1", load_depth=False)
    assert orbit.rgba.shape == (3, 32, 32, 4) and torch.allclose(orbit.elevation_deg, torch.full((3,), 15.0, dtype=torch.float64))
    expect = pipe(load_png(tmp_path / "in.png"), 15.0, seeds=[1]).frames[0].permute(0, 2, 3, 1)  # the same 8-bit input
    assert (orbit.rgba[..., :3] - expect).abs().max() <= 1 / 255 + 1e-6  # the sampled frames (8-bit PNG)
    stamp = (tmp_path / "out" / "seed_0" / "rgba" / "001.png").stat().st_mtime_ns
    assert cli(argv) == 0  # resume: complete seeds are not redone
    assert (tmp_path / "out" / "seed_0" / "rgba" / "001.png").stat().st_mtime_ns == stamp
    assert "sample_seed_1" in read_json(tmp_path / "out" / "run.json")["stages"]
