"""NeuS: hash-grid encoding vs its direct reference, geometric init, NeuS weights, a sphere fit, resume."""

import dataclasses

import pytest
import torch

from hi3d import cameras
from hi3d.data.orbit import Orbit
from hi3d.recon.hashgrid import HashGrid, reference_encode
from hi3d.recon.neus import (
    NeuSConfig,
    NeuSModel,
    composite_weights,
    fit_neus,
    load_model,
    make_optimizer,
    neus_alpha,
    render_image,
    render_rays,
    sphere_near_far,
    training_losses,
)

TINY = dict(num_levels=4, log2_hashmap_size=12, base_resolution=8, max_resolution=32, start_levels=4,
            hidden_dim=32, feature_dim=7, color_hidden_dim=32, num_samples=24, num_importance=16,
            batch_rays=256, eikonal_points=512, warmup_iters=10)


def sphere_orbit(radius: float = 0.35, size: int = 32, views: int = 8, elevation: float = 20.0) -> Orbit:
    """Exact views of an origin-centred sphere (ray-sphere intersection): alpha = hit, colour from the normal."""
    c2w, az, el = cameras.orbit_poses(views, elevation)
    K = cameras.intrinsics(size)
    rgba = []
    for i in range(views):
        o, d = cameras.get_rays(c2w[i], K, size, size)
        near, far = sphere_near_far(o.reshape(-1, 3), d.reshape(-1, 3), radius)
        hit = (far - near > 1e-6).float()
        n = torch.nn.functional.normalize(o.reshape(-1, 3) + d.reshape(-1, 3) * near[:, None], dim=-1)
        rgb = (0.3 + 0.5 * (n * 0.5 + 0.5)) * hit[:, None] + (1 - hit[:, None])
        rgba.append(torch.cat([rgb, hit[:, None]], -1).view(size, size, 4))
    return Orbit(rgba=torch.stack(rgba), c2w=c2w, K=K.expand(views, 3, 3).clone(), azimuth_deg=az,
                 elevation_deg=el, radius=torch.full((views,), 1.5, dtype=torch.float64))


def test_hashgrid_matches_direct_per_level_evaluation():
    g = torch.Generator().manual_seed(0)
    grid = HashGrid(6, 2, 10, 4, 64, init_scale=1.0, generator=g).double()
    assert grid.dense.tolist() == [True, True, False, False, False, False]  # both index kinds exercised
    x = torch.rand(400, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fast, ref = grid(x), reference_encode(grid, x)
    assert fast.shape == (400, 12)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    probe = torch.randn(400, 12, generator=g, dtype=torch.float64)
    gf = torch.autograd.grad((fast * probe).sum(), [x, grid.table], create_graph=True)
    gr = torch.autograd.grad((ref * probe).sum(), [x, grid.table], create_graph=True)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # second order (eikonal): gradient of |d enc / dx|^2 w.r.t. the table
    sf = torch.autograd.grad(gf[0].pow(2).sum(), grid.table)[0]
    sr = torch.autograd.grad(gr[0].pow(2).sum(), grid.table)[0]
    torch.testing.assert_close(sf, sr, rtol=0, atol=1e-9)


def test_hashgrid_at_the_demo_size_and_with_levels_disabled_matches_the_reference():
    g = torch.Generator().manual_seed(2)
    grid = HashGrid(12, 2, 15, 16, 256, init_scale=1.0, generator=g).double()  # configs/recon/neus.yaml
    x = torch.rand(3000, 3, generator=g, dtype=torch.float64)
    ref = reference_encode(grid, x)
    torch.testing.assert_close(grid(x), ref, rtol=0, atol=1e-12)
    part = grid(x, levels=5)  # coarse-to-fine: levels 5.. are zero and get no gradient
    torch.testing.assert_close(part[:, :10], ref[:, :10], rtol=0, atol=1e-12)
    assert not part[:, 10:].any()
    assert not grid(x, levels=0).any() and grid(x, levels=0).shape == ref.shape
    big = HashGrid(2, 2, 22, 16, 1024, init_scale=1.0, generator=g).double()  # products beyond int32: int64 rows
    assert big.index_dtype == torch.int64 and grid.index_dtype == torch.int32
    torch.testing.assert_close(big(x[:500]), reference_encode(big, x[:500]), rtol=0, atol=1e-12)
    part.sum().backward()
    assert not grid.table.grad[int(grid.offsets[5]):].any() and grid.table.grad[:int(grid.offsets[5])].any()


def test_hashgrid_dense_level_is_trilinear_interpolation_of_its_vertices():
    g = torch.Generator().manual_seed(1)
    grid = HashGrid(1, 3, 12, 7, 7, init_scale=1.0, generator=g).double()  # one dense level, 8^3 vertices
    x = torch.rand(300, 3, generator=g, dtype=torch.float64)
    vol = grid.table.detach().view(8, 8, 8, 3).permute(3, 0, 1, 2)[None]  # [1, F, z, y, x]
    coords = (x * 2 - 1).view(1, 1, 1, -1, 3)  # grid_sample takes (x, y, z) in [-1, 1]
    ref = torch.nn.functional.grid_sample(vol, coords, mode="bilinear", align_corners=True).view(3, -1).T
    torch.testing.assert_close(grid(x), ref, rtol=0, atol=1e-12)


def test_geometric_init_is_a_sphere_sdf():
    cfg = NeuSConfig(init_radius=0.5)
    model = NeuSModel(cfg, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    d = torch.nn.functional.normalize(torch.randn(4000, 3, generator=g), dim=-1)
    r = torch.rand(4000, 1, generator=g) * 0.8 + 0.1
    err = (model.query_sdf(d * r) - (r[:, 0] - 0.5)).abs()
    assert err.max() < 0.015 and err.mean() < 0.004
    near = (r[:, 0] - 0.5).abs() < 0.05
    assert err[near].max() < 0.01


def test_neus_weights_are_unbiased_at_the_surface():
    # a plane crossing the ray at t0 = 0.4 (head-on, sdf = t0 - t): the weights peak at t0 and the
    # expected depth is t0 (NeuS's unbiasedness), for sharp and moderate inv_s alike
    t = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)[None]
    sdf = 0.4 - t
    for inv_s in (50.0, 400.0):
        w = composite_weights(neus_alpha(sdf[:, :-1], sdf[:, 1:], inv_s))
        mid = (t[:, :-1] + t[:, 1:]) / 2
        assert abs(float(mid[0, w[0].argmax()]) - 0.4) < 1e-3
        assert abs(float((w * mid).sum() / w.sum()) - 0.4) < 2e-3
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-3)


def test_sdf_supervised_sphere_fit_matches_analytic():
    """Fit the SDF network directly by SDF supervision to a sphere r = 0.3 off-centre (the init is r = 0.5 at 0)."""
    r, c = 0.3, torch.tensor([0.1, -0.05, 0.05])
    cfg = NeuSConfig(**TINY)
    model = NeuSModel(cfg, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.sdf_net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.05 ** (i / 150))
    g = torch.Generator().manual_seed(1)
    for _ in range(150):  # half the points within 20% of the surface, half uniform
        d = torch.nn.functional.normalize(torch.randn(1024, 3, generator=g), dim=-1)
        x = torch.cat([c + d * r * (1 + (torch.rand(1024, 1, generator=g) * 2 - 1) * 0.2),
                       (torch.rand(512, 3, generator=g) * 2 - 1) * 0.8])
        loss = (model.sdf_net.sdf(x) - ((x - c).norm(dim=-1) - r)).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    d = torch.nn.functional.normalize(torch.randn(2000, 3, generator=g), dim=-1)
    dist = r * (1 + (torch.rand(2000, 1, generator=g) * 2 - 1) * 0.1)  # within 10% of the surface
    err = (model.query_sdf(c + d * dist) - (dist[:, 0] - r)).abs()
    assert err.max() < 0.02 * r and err.mean() < 0.005 * r


def test_volume_prior_is_the_soft_occupied_fraction_and_carves_unobserved_space():
    """With only the volume prior (and eikonal), the loss starts at the init sphere's share of the sampling
    cube ((4/3)π 0.5³ / 1.8³ = 0.090) and optimising it shrinks the sphere."""
    cfg = NeuSConfig(**TINY, color_weight=0.0, mask_weight=0.0, volume_weight=1.0, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model = NeuSModel(cfg, gen)
    o, d = torch.tensor([[0.0, -1.5, 0.0]]).expand(64, 3), torch.tensor([[0.0, 1.0, 0.0]]).expand(64, 3)
    batch = {"origins": o, "dirs": d, "rgb": torch.ones(64, 3), "alpha": torch.zeros(64)}
    first = training_losses(model, batch, cfg, gen)
    assert set(first) >= {"volume", "eikonal"} and abs(first["volume"].item() - 0.090) < 0.03
    assert "volume" not in training_losses(model, batch, dataclasses.replace(cfg, volume_weight=0.0), gen)
    opt = make_optimizer(model, cfg)
    for _ in range(30):
        loss = training_losses(model, batch, cfg, gen)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe = torch.nn.functional.normalize(torch.randn(500, 3, generator=gen), dim=-1) * 0.45
    assert model.query_sdf(probe).mean() > 0.0  # was -0.05: the surface moved inside r = 0.45
    assert training_losses(model, batch, cfg, gen)["volume"].item() < 0.5 * first["volume"].item()


@pytest.mark.slow
def test_rendered_sphere_fit_matches_analytic():
    """Fit NeuS on rendered views of a sphere (r = 0.35; the init is r = 0.5), compare SDFs near the surface."""
    r = 0.35
    cfg = NeuSConfig(**TINY, iterations=200, mask_weight=0.5, lr=2e-2)
    model = fit_neus(sphere_orbit(r), cfg, progress=False)
    g = torch.Generator().manual_seed(2)
    d = torch.nn.functional.normalize(torch.randn(2000, 3, generator=g), dim=-1)
    dist = r * (1 + (torch.rand(2000, 1, generator=g) * 2 - 1) * 0.1)  # within 10% of the surface
    err = (model.query_sdf(d * dist) - (dist[:, 0] - r)).abs()
    assert torch.quantile(err, 0.95) < 0.04 * r
    out = render_rays(model, *sphere_rays())
    assert out["opacity"][0] > 0.95 and out["opacity"][1] < 0.05  # hit / miss


def sphere_rays():
    o = torch.tensor([[0.0, -1.5, 0.0], [0.0, -1.5, 0.0]])
    d = torch.nn.functional.normalize(torch.tensor([[0.0, 1.0, 0.0], [0.5, 1.0, 0.0]]), dim=-1)
    return o, d


def test_interrupted_fit_resumes_to_the_uninterrupted_result(tmp_path):
    orbit = sphere_orbit(size=16, views=4)
    cfg = NeuSConfig(**TINY, iterations=8, checkpoint_every=3)
    full = fit_neus(orbit, cfg, progress=False)

    def interrupt(step, losses):
        if step == 4:
            raise KeyboardInterrupt

    ckpt = tmp_path / "neus.pt"
    with pytest.raises(KeyboardInterrupt):
        fit_neus(orbit, cfg, ckpt, progress=False, callback=interrupt)
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    steps = []
    resumed = fit_neus(orbit, cfg, ckpt, progress=False, callback=lambda s, _: steps.append(s))
    assert steps == list(range(3, 8))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")  # summation order only
    loaded, step = load_model(ckpt)
    assert step == 8 and dataclasses.asdict(loaded.cfg) == dataclasses.asdict(cfg)
    torch.testing.assert_close(loaded.variance, resumed.variance)


def silhouette_iou(model: NeuSModel, orbit: Orbit) -> float:
    """Mean IoU of the rendered opacity > 0.5 and the views' alpha > 0.5."""
    ious = []
    for i in range(len(orbit)):
        pred = render_image(model, orbit.c2w[i], orbit.K[i], orbit.width, orbit.height)["opacity"] > 0.5
        gt = orbit.rgba[i, ..., 3] > 0.5
        ious.append(float((pred & gt).sum() / (pred | gt).sum()))
    return sum(ious) / len(ious)


def test_neus_learns_real_geometry_from_images_in_a_few_dozen_steps(bunny_path):
    """40 steps on 8 rendered 32² views of the Stanford bunny: the silhouette IoU at 4 held-out azimuths (half-way
    between training views) rises from the initial sphere's ~0.58 to >= 0.80, by at least 0.2."""
    from hi3d.data.render import RenderConfig, render_orbit

    def orbit(offset):
        return render_orbit(bunny_path, RenderConfig(num_views=8 if offset == 0 else 4, resolution=32, elevation=20.0,
                                                     azimuth_offset=offset, normals=False, depth=False,
                                                     contact_sheet=False))

    train, held_out = orbit(0.0), orbit(22.5)
    cfg = NeuSConfig(**TINY, iterations=40, mask_weight=0.5, lr=2e-2)
    before = silhouette_iou(NeuSModel(cfg, torch.Generator().manual_seed(cfg.seed)), held_out)
    after = silhouette_iou(fit_neus(train, cfg, progress=False), held_out)
    print(f"held-out silhouette IoU {before:.3f} -> {after:.3f}")
    assert after >= 0.80 and after - before >= 0.2, (before, after)
