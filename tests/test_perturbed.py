import math

import numpy as np
import pytest
import torch
from conftest import real_object

from hi3d import cameras
from hi3d.data.render import RenderConfig, render_orbit, render_views
from hi3d.errors import Hi3DError
from hi3d.eval.perturbed import PerturbConfig, displacement_field, generate_perturbed, perturb_orbit

OFF = dict(shape=0.0, jitter_deg=0.0, exposure_ev=0.0, white_balance=0.0, degrade=0.0)


@pytest.fixture(scope="module")
def gt():
    return render_orbit(real_object("wuson"), RenderConfig(num_views=5, elevation=20.0, resolution=64))


def only(**kw):
    return PerturbConfig(**{**OFF, **kw})


def test_strength_zero_is_the_ground_truth_and_seeds_repeat(gt):
    out, rec = perturb_orbit(gt, PerturbConfig(strength=0.0), seed=3)
    assert torch.allclose(out.rgba, gt.rgba, atol=1 / 255)
    assert torch.equal(out.c2w, gt.c2w) and rec[0] == {"view": 0, "clean": True}
    a, _ = perturb_orbit(gt, PerturbConfig(), seed=1)
    b, _ = perturb_orbit(gt, PerturbConfig(), seed=1)
    c, _ = perturb_orbit(gt, PerturbConfig(), seed=2)
    assert torch.equal(a.rgba, b.rgba) and not torch.equal(a.rgba, c.rgba)
    assert torch.equal(a.rgba[0], gt.rgba[0])  # the input view stays clean


def test_jitter_renders_at_a_pose_rotated_by_the_stated_angle(gt):
    out, rec = perturb_orbit(gt, only(jitter_deg=4.0, strength=0.75), seed=0)
    assert torch.equal(out.c2w, gt.c2w)  # labelled with the nominal pose
    for i in range(1, len(gt)):
        true = torch.tensor(rec[i]["true_c2w"], dtype=torch.float64)
        R = true[:3, :3].T @ gt.c2w[i, :3, :3]
        angle = math.degrees(math.acos(max(-1.0, min(1.0, (float(torch.trace(R)) - 1) / 2))))
        c, c0 = true[:3, 3], gt.c2w[i, :3, 3]
        centre_angle = math.degrees(math.acos(float(c @ c0 / (c.norm() * c0.norm()))))
        assert angle == pytest.approx(3.0, abs=1e-6) and centre_angle == pytest.approx(3.0, abs=1e-6)
        assert float(c.norm()) == pytest.approx(float(c0.norm()))
        # the view is the object rendered at the recorded true pose, not at the nominal one
        again = render_views(gt.meta["mesh"], true[None], gt.K[i], gt.width, gt.height, with_depth=False)
        assert (out.rgba[i] - again.rgba[0]).abs().max() < 2 / 255
        assert (out.rgba[i, ..., 3] - gt.rgba[i, ..., 3]).abs().sum() > 5


def test_exposure_and_white_balance_scale_the_object_by_the_recorded_gains(gt):
    out, rec = perturb_orbit(gt, only(exposure_ev=0.3, white_balance=0.1), seed=5)
    gains = []
    for i in range(1, len(gt)):
        gain, wb = rec[i]["exposure_gain"], torch.tensor(rec[i]["white_balance_gains"], dtype=torch.float64)
        assert float(wb.prod()) == pytest.approx(1.0, rel=1e-9)
        expect = gain * wb.float()
        ok = (gt.rgba[i, ..., 3] > 0.99) & ((gt.rgba[i, ..., :3] * expect).amax(-1) < 0.98)
        ratio = out.rgba[i, ..., :3][ok].mean(0) / gt.rgba[i, ..., :3][ok].mean(0)
        assert torch.allclose(ratio, expect, rtol=0.01)
        assert torch.equal(out.rgba[i, ..., 3], gt.rgba[i, ..., 3])
        gains.append(gain)
    assert len({round(g, 6) for g in gains}) == len(gains) and all(g != 1 for g in gains)


def test_shape_errors_move_the_silhouette_by_at_most_the_amplitude(gt):
    from scipy.ndimage import distance_transform_edt

    pts = np.random.default_rng(0).uniform(-0.5, 0.5, (2000, 3))
    d = displacement_field(pts, 0.02, 4, 1.5, torch.Generator().manual_seed(0))
    assert np.linalg.norm(d, axis=1).max() == pytest.approx(0.02)
    amp = 0.03
    out, _ = perturb_orbit(gt, only(shape=amp), seed=0)
    fx, dist = float(gt.K[0, 0, 0]), cameras.DEFAULT_RADIUS - 0.87  # nearest surface point: inside the unit cube
    reach = amp * fx / dist + 1.5  # pixels a displacement of amp can move an edge, plus antialiasing
    changed = 0
    for i in range(1, len(gt)):
        m0, m1 = gt.rgba[i, ..., 3].numpy() > 0.5, out.rgba[i, ..., 3].numpy() > 0.5
        to_edge = np.minimum(distance_transform_edt(m0), distance_transform_edt(~m0))
        diff = m0 != m1
        assert diff.any() and to_edge[diff].max() <= reach
        changed += diff.sum()
    assert changed > 20


def test_degradation_blends_towards_the_stage2_training_degradation(gt):
    half, _ = perturb_orbit(gt, only(degrade=0.5), seed=0)
    full, rec = perturb_orbit(gt, only(degrade=1.0), seed=0)
    on = gt.rgba[1:, ..., 3] > 0.999
    clean = gt.rgba[1:, ..., :3][on]
    assert torch.allclose(half.rgba[1:, ..., :3][on] - clean, 0.5 * (full.rgba[1:, ..., :3][on] - clean), atol=1e-5)
    assert (full.rgba[1:, ..., :3][on] - clean).abs().mean() > 0.01 and rec[1]["degrade_weight"] == 1.0
    assert torch.equal(full.rgba[0], gt.rgba[0])


def test_generate_perturbed_writes_an_orbit_and_its_record(tmp_path, gt):
    from hi3d.data.orbit import load_orbit, save_orbit
    from hi3d.io import read_json

    save_orbit(gt, tmp_path / "gt")
    out = generate_perturbed(tmp_path / "gt", tmp_path / "gen", PerturbConfig(strength=0.5), seed=0)
    views = load_orbit(out, load_depth=False)
    assert len(views) == 5 and views.meta["perturbation"]["config"]["strength"] == 0.5
    assert views.source[1] == "generated" and len(read_json(out / "perturbation.json")["views"]) == 5
    with pytest.raises(Hi3DError, match="perturb.jitter_deg"):
        perturb_orbit(gt, PerturbConfig(jitter_deg=-1), seed=0)
    with pytest.raises(Hi3DError, match="blend weight"):
        perturb_orbit(gt, PerturbConfig(strength=3.0), seed=0)
