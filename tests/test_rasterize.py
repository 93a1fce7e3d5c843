import math

import pytest
import torch

from hi3d import cameras
from hi3d.recon.rasterize import (
    _viewmat,
    bin_tiles,
    project_gaussians,
    quat_to_rotmat,
    rasterize,
    rasterize_dense,
    rasterize_tiles,
)


def random_scene(n, seed, dtype=torch.float64, opacity=(0.0, 1.0), scale=(0.01, 0.08)):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 0.9
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 3, generator=g, dtype=dtype)
    opac = opacity[0] + (opacity[1] - opacity[0]) * torch.rand(n, generator=g, dtype=dtype)
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (means, quats, scales, opac, colors)]


def camera(W, H, az=30.0, el=20.0):
    return cameras.orbit_c2w(az, el, 1.5), cameras.intrinsics(W, H)


def stack(r):
    return torch.cat([r.rgb, r.alpha[..., None], r.depth[..., None]], -1)


@pytest.mark.parametrize("n,W,H,tile,opacity,seed", [
    (60, 40, 36, 8, (0.0, 1.0), 0),
    (200, 37, 29, 16, (0.6, 1.0), 1),   # saturated: early stop (T < 1e-4) and 0.99 clamp are hit
    (120, 32, 32, 4, (0.0, 1.0), 2),
])
def test_tiles_match_dense_forward_and_backward(n, W, H, tile, opacity, seed):
    params = random_scene(n, seed, opacity=opacity)
    c2w, K = camera(W, H, az=17.0 * seed)
    bg = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    dense = rasterize_dense(*params, c2w, K, W, H, background=bg)
    tiles = rasterize_tiles(*params, c2w, K, W, H, background=bg, tile_size=tile, chunk_elements=4096)
    assert dense.rgb.shape == (H, W, 3) and dense.alpha.shape == dense.depth.shape == (H, W)
    assert dense.alpha.max() > 0.5  # the scene is visible
    assert (stack(dense) - stack(tiles)).abs().max() < 1e-4
    weights = torch.rand(H, W, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g_dense = torch.autograd.grad((stack(dense) * weights).sum(), params)
    g_tiles = torch.autograd.grad((stack(tiles) * weights).sum(), params)
    for name, a, b in zip(["means", "quats", "scales", "opacities", "colors"], g_dense, g_tiles):
        assert a.norm() > 0, name
        assert (a - b).norm() / a.norm() < 1e-3, name


def test_tiles_gradcheck_finite_differences():
    params = random_scene(4, 5, opacity=(0.5, 0.9), scale=(0.05, 0.1))
    c2w, K = camera(16, 16)

    def f(*p):
        return stack(rasterize_tiles(*p, c2w, K, 16, 16, background=torch.ones(3, dtype=torch.float64)))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


def test_early_stop_rule():
    """Four opaque discs on the axis, o = 0.95: T = 0.05, 0.0025, 1.25e-4 after three; the fourth
    would bring T below 1e-4, so it and everything behind are skipped (3DGS rule)."""
    W = H = 9
    K = cameras.intrinsics(W, H)
    c2w = torch.eye(4, dtype=torch.float64)
    n = 5
    means = torch.tensor([[0.0, 0.0, 1.0 + i] for i in range(n)], dtype=torch.float64)
    quats = torch.tensor([[1.0, 0, 0, 0]] * n, dtype=torch.float64)
    scales = torch.full((n, 3), 100.0, dtype=torch.float64)  # flat over the whole image
    opac = torch.full((n,), 0.95, dtype=torch.float64)
    colors = torch.eye(n, dtype=torch.float64)
    for fn in (rasterize_dense, rasterize_tiles):
        r = fn(means, quats, scales, opac, colors, c2w, K, W, H, background=torch.zeros(n, dtype=torch.float64))
        centre = r.rgb[H // 2, W // 2]
        expected = torch.tensor([0.95, 0.05 * 0.95, 0.0025 * 0.95, 0.0, 0.0], dtype=torch.float64)
        assert torch.allclose(centre, expected, atol=1e-6)
        assert abs(r.alpha[H // 2, W // 2].item() - (1 - 1.25e-4)) < 1e-6


@pytest.mark.parametrize("fn", [rasterize_dense, rasterize_tiles])
def test_isotropic_gaussian_renders_analytic_image(fn):
    W, H, z, s, o = 48, 40, 2.0, 0.05, 0.8
    K = cameras.intrinsics(W, H)
    f = K[0, 0].item()
    means = torch.tensor([[0.0, 0.0, z]], dtype=torch.float64)
    r = fn(means, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64), torch.full((1, 3), s, dtype=torch.float64),
           torch.tensor([o], dtype=torch.float64), torch.tensor([[0.2, 0.4, 0.6]], dtype=torch.float64),
           torch.eye(4, dtype=torch.float64), K, W, H, background=torch.ones(3, dtype=torch.float64))
    var = (f * s / z) ** 2 + 0.3  # EWA projection of s² I on the axis + 0.3 px² low-pass
    uv = cameras.pixel_centers(W, H, torch.float64) - torch.tensor([W / 2, H / 2], dtype=torch.float64)
    alpha = o * torch.exp(-0.5 * (uv ** 2).sum(-1) / var)
    alpha = torch.where(alpha >= 1 / 255, alpha, torch.zeros_like(alpha))
    assert (r.alpha - alpha).abs().max() < 1e-10
    rgb = alpha[..., None] * torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64) + (1 - alpha[..., None])
    assert (r.rgb - rgb).abs().max() < 1e-10
    assert torch.allclose(r.depth[alpha > 0], torch.full_like(r.depth[alpha > 0], z))
    assert (r.depth[alpha == 0] == 0).all() and (alpha == 0).any()


def test_projection_matches_gsplat_torch_reference():
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    means, quats, scales, opac, _ = random_scene(50, 3)
    c2w, K = camera(64, 48)
    proj = project_gaussians(means, quats, scales, opac, _viewmat(c2w), K, 64, 48)
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, _viewmat(c2w)[None], K[None], 64, 48)
    assert torch.allclose(proj.means2d, means2d[0]) and torch.allclose(proj.depths, depths[0])
    assert torch.allclose(proj.conics, conics[0], rtol=1e-6, atol=1e-9)
    # our opacity-aware extents never exceed gsplat's 3.33-sigma radii
    assert (proj.extent[proj.valid] <= radii[0][proj.valid] + 1e-2).all()


def test_quaternion_rotation_is_orthonormal():
    R = quat_to_rotmat(torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(10, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(10, dtype=torch.float64))


def test_binning_sorted_by_tile_then_depth():
    means, quats, scales, opac, _ = random_scene(300, 4)
    c2w, K = camera(64, 64)
    proj = project_gaussians(means, quats, scales, opac, _viewmat(c2w), K, 64, 64)
    gauss_ids, tile_ids, start, count = bin_tiles(proj, 64, 64, 8)
    assert (tile_ids[1:] >= tile_ids[:-1]).all()
    same = tile_ids[1:] == tile_ids[:-1]
    z = proj.depths.detach()[gauss_ids]
    assert (z[1:][same] >= z[:-1][same]).all()
    assert count.sum() == len(gauss_ids) and (start[1:] == (start + count)[:-1]).all()


def test_empty_and_culled_scenes_give_background():
    means, quats, scales, opac, colors = random_scene(10, 6)
    c2w, K = camera(16, 16)
    behind = means.detach() + 10 * torch.tensor(c2w[:3, 2].tolist(), dtype=torch.float64) * -1  # behind the camera
    r = rasterize(behind, quats, scales, opac, colors, c2w, K, 16, 16, background=torch.ones(3, dtype=torch.float64))
    assert torch.equal(r.rgb, torch.ones(16, 16, 3, dtype=torch.float64)) and r.alpha.abs().max() == 0
    assert (r.info["radii"] == 0).all()


def test_float32_training_precision():
    params = [p.detach().float().requires_grad_() for p in random_scene(300, 7)]
    ref = [p.detach().double() for p in params]
    c2w, K = camera(64, 64)
    fast = rasterize(*params, c2w, K, 64, 64, background=torch.ones(3))
    exact = rasterize_dense(*ref, c2w, K, 64, 64, background=torch.ones(3, dtype=torch.float64))
    err = (fast.rgb.double() - exact.rgb).abs()
    assert err.mean() < 1e-5 and torch.quantile(err.flatten(), 0.999) < 1e-3


@pytest.mark.gpu
def test_gsplat_cuda_matches_ours():
    params = [p.detach().float().to(torch.device("cuda")).requires_grad_() for p in random_scene(500, 8, opacity=(0.0, 0.9))]
    c2w, K = camera(64, 64)
    ours = rasterize_tiles(*[p.detach().cpu() for p in params], c2w, K, 64, 64, background=torch.ones(3))
    theirs = rasterize(*params, c2w, K, 64, 64, background=torch.ones(3, device="cuda"))
    assert (theirs.rgb.cpu() - ours.rgb).abs().mean() < 2e-3
    assert (theirs.alpha.cpu() - ours.alpha).abs().mean() < 2e-3
    assert math.isfinite(theirs.rgb.sum().item())
