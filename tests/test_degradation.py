import json
import math
from pathlib import Path

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F
from conftest import missing_fixture

from hi3d.data import degradation as D
from hi3d.data.orbit import Orbit, load_orbit, save_orbit
from hi3d.data.real_objects import REAL_OBJECTS

TEXTURE = Path(REAL_OBJECTS["spider"][0]).with_name("SpiderTex.jpg")  # the spider's texture


def _psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def _object_video(frames=4, size=64):
    """RGB ``[1, F, 3, S, S]`` (a real texture) and a disc alpha ``[1, F, 1, S, S]`` that moves per frame."""
    from PIL import Image

    if not TEXTURE.is_file():
        missing_fixture(f"real texture {TEXTURE} missing: apt-get install {REAL_OBJECTS['spider'][1]}")
    tex = np.asarray(Image.open(TEXTURE).convert("RGB").resize((size, size))).astype(np.float32) / 255
    rgb = torch.from_numpy(tex).permute(2, 0, 1)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    alphas = [(((xs - size / 2 - 3 * i) ** 2 + (ys - size / 2) ** 2) < (0.35 * size) ** 2).float()
              for i in range(frames)]
    return rgb.expand(1, frames, 3, size, size).clone(), torch.stack(alphas)[None, :, None]


def test_isotropic_gaussian_matches_formula_and_sums_to_one():
    k = D.bivariate_gaussian(9, *(torch.tensor([1.7], dtype=torch.float64),) * 2, torch.tensor([0.0]))[0]
    ax = np.arange(9) - 4.0
    direct = np.exp(-(ax[None] ** 2 + ax[:, None] ** 2) / (2 * 1.7**2))
    np.testing.assert_allclose(k.numpy(), direct / direct.sum(), atol=1e-12)
    assert abs(float(k.sum()) - 1) < 1e-12


def test_anisotropic_kernels_match_formulas():
    sx, sy, th, beta = 2.5, 0.8, 0.6, 1.7
    x = np.arange(11) - 5.0
    xx, yy = np.meshgrid(x, x)
    # rotate the offsets into the kernel's principal axes
    u = np.cos(th) * xx + np.sin(th) * yy
    v = -np.sin(th) * xx + np.cos(th) * yy
    q = u**2 / sx**2 + v**2 / sy**2
    args = (11, *(torch.tensor([v], dtype=torch.float64) for v in (sx, sy, th)))
    for got, ref in [(D.bivariate_gaussian(*args), np.exp(-0.5 * q)),
                     (D.bivariate_generalized_gaussian(*args, torch.tensor([beta], dtype=torch.float64)), np.exp(-0.5 * q**beta)),
                     (D.bivariate_plateau(*args, torch.tensor([beta], dtype=torch.float64)), 1 / (q**beta + 1))]:
        np.testing.assert_allclose(got[0].numpy(), ref / ref.sum(), atol=1e-12)
    # generalised Gaussian with β = 1 is the Gaussian
    torch.testing.assert_close(D.bivariate_generalized_gaussian(*args, torch.tensor([1.0])), D.bivariate_gaussian(*args))


def test_sinc_kernel_matches_bessel_formula():
    w, k = 1.3, 13
    ax = np.arange(k) - 6.0
    r = np.sqrt(ax[None] ** 2 + ax[:, None] ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = w * scipy.special.j1(w * r) / (2 * np.pi * r)
    ref[6, 6] = w**2 / (4 * np.pi)
    got = D.circular_lowpass_kernel(torch.tensor([w], dtype=torch.float64), k)[0].numpy()
    np.testing.assert_allclose(got, ref / ref.sum(), atol=1e-7)


def test_random_kernels_sum_to_one_and_respect_their_size():
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        k = D.random_kernels(g, 64, D.KERNEL_TYPES, [0.45, 0.25, 0.12, 0.03, 0.12, 0.03], 0.3, [0.2, 3.0],
                             [0.5, 4.0], [1.0, 2.0])
        assert k.shape == (64, 21, 21)
        torch.testing.assert_close(k.sum((1, 2)), torch.ones(64, dtype=torch.float64))
        torch.testing.assert_close(k, k.flip(-1, -2))  # point symmetric (convolution == correlation)
    wide = D.random_kernels(g, 64, ["iso"], [1.0], 0.0, [3.0, 3.0], [0.5, 4.0], [1.0, 2.0])
    support = (wide.abs() > 0).any(1).sum(-1)  # width of the non-zero columns = drawn kernel size
    assert set(support.tolist()) == set(range(7, 22, 2))
    final = D.random_final_sinc(g, 200, 0.8)
    torch.testing.assert_close(final.sum((1, 2)), torch.ones(200, dtype=torch.float64))
    identity = (final[:, 10, 10] == 1).float().mean()
    assert 0.1 < identity < 0.3  # ≈ 1 - final_sinc_prob


def test_filter2d_matches_per_image_conv():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 20, 24, generator=g)
    k = D.random_kernels(g, 3, ["aniso"], [1.0], 0.0, [0.5, 3.0], [0.5, 4.0], [1.0, 2.0], kernel_size=7)
    out = D.filter2d(x, k)
    for i in range(3):
        ref = F.conv2d(F.pad(x[i:i + 1], (3, 3, 3, 3), mode="reflect"), k[i].float().expand(3, 1, 7, 7), groups=3)
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=0)


def test_sinc_ringing_on_step_edge():
    step = torch.zeros(1, 3, 32, 64)
    step[..., 32:] = 1.0
    out = D.filter2d(step, D.circular_lowpass_kernel(torch.tensor([math.pi / 3]), 21))
    row = out[0, 0, 16]
    assert row.max() > 1.03 and row.min() < -0.03  # overshoot and undershoot (Gibbs ringing)
    blurred = D.filter2d(step, D.bivariate_gaussian(21, *(torch.tensor([2.0]),) * 2, torch.tensor([0.0])))
    assert blurred.max() <= 1 + 1e-6 and blurred.min() >= -1e-6  # a Gaussian does not ring


def test_jpeg_simulation_matches_pil():
    rgb, _ = _object_video(1, 64)
    x = rgb[0]
    for q in (30.0, 60.0, 90.0):
        quality = torch.tensor([q])
        ours, ref = D.jpeg_compress(x, quality), D.jpeg_pil(x, quality)
        assert _psnr(ours, ref) > 33
        assert abs(_psnr(ours, x) - _psnr(ref, x)) < 1.0
    low, high = D.jpeg_compress(x, torch.tensor([30.0])), D.jpeg_compress(x, torch.tensor([95.0]))
    assert _psnr(low, x) < _psnr(high, x)
    odd = torch.rand(2, 3, 21, 37)
    assert D.jpeg_compress(odd, torch.tensor([50.0, 80.0])).shape == odd.shape


def test_noise_statistics():
    g = torch.Generator().manual_seed(1)
    x = torch.full((4, 3, 64, 64), 0.5)
    n = D.gaussian_noise(x, torch.tensor([0.1, 0.1, 0.02, 0.02]), torch.tensor([False, True, False, True]), g)
    assert abs(float(n[0].std()) - 0.1) < 0.005 and abs(float(n[2].std()) - 0.02) < 0.002
    torch.testing.assert_close(n[1, 0], n[1, 2])  # grey: same noise on every channel
    assert not torch.allclose(n[0, 0], n[0, 2])
    p = D.poisson_noise(x, torch.tensor([1.0, 3.0, 1.0, 1.0]), torch.tensor([False, False, True, False]), g)
    assert float(p[1].std()) > 2 * float(p[0].std()) > 0
    torch.testing.assert_close(p[2, 0], p[2, 1])


def test_masking_changes_only_object_pixels():
    rgb, alpha = _object_video(6, 64)
    x, mask = rgb[0], alpha[0] > 0.5
    g = torch.Generator().manual_seed(0)
    out = D.random_object_masking(x, mask, g, prob=1.0, blobs=[2, 3], radius=[0.2, 0.4], white_prob=0.5)
    changed = (out != x).any(1, keepdim=True)
    assert changed.any() and not (changed & ~mask).any()
    assert changed.flatten(1).any(1).all()  # every frame got a blob at prob 1
    skip = torch.tensor([True] + [False] * 5)
    out2 = D.random_object_masking(x, mask, torch.Generator().manual_seed(0), 1.0, [1, 3], [0.2, 0.4], 0.5, skip=skip)
    assert torch.equal(out2[0], x[0])


def test_degrade_video_determinism_range_shape_and_clean_first_frame():
    rgb, alpha = _object_video(4, 64)
    cfg = D.DegradationConfig(degrade_size=48)
    run = lambda seed, **kw: D.degrade_video(rgb, cfg, torch.Generator().manual_seed(seed), alpha=alpha, **kw)  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.shape == rgb.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    on_white = rgb * alpha + 1 - alpha
    torch.testing.assert_close(a[:, 0], on_white[:, 0])  # frame 0 untouched at the input size
    assert _psnr(a[:, 1:], on_white[:, 1:]) < 35  # the others are degraded
    big = run(0, out_size=(96, 96))
    assert big.shape == (1, 4, 3, 96, 96)
    cfg.keep_first_frame = False
    assert not torch.equal(D.degrade_video(rgb, cfg, torch.Generator().manual_seed(0), alpha=alpha)[:, 0], on_white[:, 0])
    # batched: frames of one video get different kernels/noise (a static video degrades differently per frame)
    static = D.degrade_video(on_white[:, :1].expand(1, 3, 3, 64, 64), cfg, torch.Generator().manual_seed(2))
    assert not torch.equal(static[0, 1], static[0, 2])


def test_degrade_cli_writes_orbit_and_run_json(tmp_path):
    from hi3d import cameras
    from hi3d.cli import main

    rgb, alpha = _object_video(3, 32)
    c2w, az, el = cameras.orbit_poses(3, 10.0, 1.5)
    orbit = Orbit(rgba=torch.cat([rgb[0], alpha[0]], 1).permute(0, 2, 3, 1), c2w=c2w,
                  K=cameras.intrinsics(32, 32, 49.1).expand(3, 3, 3).clone(), azimuth_deg=az,
                  elevation_deg=el, radius=torch.full((3,), 1.5, dtype=torch.float64))
    save_orbit(orbit, tmp_path / "orbit")
    out = tmp_path / "deg"
    assert main(["degrade", str(tmp_path / "orbit"), "--out", str(out), "--seed", "4", "--size", "64",
                 "degrade_size=32"]) == 0
    deg = load_orbit(out)
    assert deg.rgba.shape == (3, 64, 64, 4) and deg.source == ["degraded"] * 3
    torch.testing.assert_close(deg.K[:, 0, 0], orbit.K[:, 0, 0] * 2)
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 4 and run["config"]["degrade_size"] == 32 and "degrade" in run["stages"]
    assert (out / "clean_vs_degraded.png").is_file()
    assert main(["degrade", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["degrade", str(tmp_path / "orbit"), "--out", str(out), "blur_sigmaa=[1,2]"]) == 2


def _texture_video(b, f, size, seed=0):
    """Fully opaque random texture videos ``[B, F, 3, S, S]`` in [0.1, 0.9] (no white pixel)."""
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(b, f, 3, size, size, generator=g)


def test_release_resolution_sequence():
    """Row 9 of issue 13 (``vtdm/degraded_images.py``): round 1 on the full-resolution frames (resize by
    ``scale_factor`` -> floor(H·s1)), round 2 at int(256·s2), final 256, upsampled back; here 128 -> 32."""
    cfg = D.DegradationConfig(degrade_size=32)
    trace = []
    out = D.degrade_video(_texture_video(6, 2, 128), cfg, torch.Generator().manual_seed(0), trace=trace)
    assert out.shape == (6, 2, 3, 128, 128) and len(trace) == 6
    for t in trace:
        s1, s2 = t["round1"]["scale"], t["round2"]["scale"]
        assert t["input"] == (128, 128)
        assert t["round1"]["size"] == (math.floor(128 * s1),) * 2 and 0.15 <= s1 <= 1.5
        assert t["round2"]["size"] == (int(32 * s2),) * 2 and 0.3 <= s2 <= 1.2
        assert t["final"]["size"] == (32, 32) and t["output"]["size"] == (128, 128)
    assert {t["round1"]["scale"] for t in trace} != {1.0}


def test_background_rewhitened_exactly_where_alpha_is_zero():
    rgb, alpha = _object_video(4, 64)
    cfg = D.DegradationConfig(degrade_size=32, keep_first_frame=False)
    out = D.degrade_video(rgb, cfg, torch.Generator().manual_seed(3), alpha=alpha)
    bg = (alpha == 0).expand_as(out)
    assert (out[bg] == 1.0).all()
    assert (out[~bg] < 0.999).float().mean() > 0.5  # the object is not whitened
    on_white = rgb * alpha + 1 - alpha  # without alpha: where the ground truth is exactly white
    out2 = D.degrade_video(on_white, cfg, torch.Generator().manual_seed(3))
    assert (out2[(on_white == 1).all(2, keepdim=True).expand_as(out2)] == 1.0).all()


def test_per_video_draws():
    """Noise type, second blur, resize modes and the final upsampling are drawn once per video, in the
    release's proportions; the upsampling mode is seen in every frame of the video: area (16 -> 32) leaves
    2×2 blocks constant, bilinear/bicubic do not."""
    cfg = D.DegradationConfig(degrade_size=16, keep_first_frame=False)
    trace = []
    out = D.degrade_video(_texture_video(48, 3, 32), cfg, torch.Generator().manual_seed(5), trace=trace)
    gauss = np.mean([t["round1"]["noise"] == "gaussian" for t in trace])
    blur2 = np.mean([t["round2"]["blur"] for t in trace])
    assert 0.25 < gauss < 0.75 and 0.6 < blur2 < 0.95  # gaussian_noise_prob 0.5, second_blur_prob 0.8
    modes = [t["output"]["mode"] for t in trace]
    assert set(modes) == {"area", "bilinear", "bicubic"}
    for video, mode in zip(out, modes):
        blocks = video.unflatten(-1, (16, 2)).unflatten(-3, (16, 2))  # [F, 3, 16, 2, 16, 2]
        constant = (blocks == blocks[:, :, :, :1, :, :1]).flatten(1).all(1)  # per frame
        assert constant.tolist() == [mode == "area"] * 3
    assert D.DegradationConfig().object_mask_prob == 0.0 and D.DegradationConfig().output_resize_mode == "random"
