"""Elevation estimation (hi3d.pipelines.elevation) and ``hi3d generate --elevation auto``."""

import json

import pytest
import torch

from hi3d import cameras as C
from hi3d.cli import main
from hi3d.data.orbit import load_orbit
from hi3d.pipelines import elevation as E

R_SPHERE = 0.4


def sphere_masks(c2w, K, size):
    """Exact silhouettes ``[N, size, size]`` of the sphere of radius R_SPHERE at the origin (pixel centres)."""
    out = []
    for c in c2w:
        o, d = C.get_rays(c, K, size, size, dtype=torch.float64)
        b = (o * d).sum(-1)
        out.append((b * b - ((o * o).sum(-1) - R_SPHERE**2) > 0).float())
    return torch.stack(out)


def iou(a, b):
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / (a | b).sum())


def test_sphere_hull_contains_the_sphere_and_projects_to_its_disc():
    size, D, extent = 64, 48, 0.75
    K = C.intrinsics(size)
    c2w, _, _ = C.orbit_poses(8, 20.0)
    masks = sphere_masks(c2w, K, size)
    hull = E.visual_hull(masks, c2w, K, D, extent, dilate=1)
    tight = E.visual_hull(masks, c2w, K, D, extent, dilate=0)
    assert hull.shape == (D, D, D) and hull.dtype == torch.bool
    assert (hull | tight).equal(hull) and hull.sum() > tight.sum()
    r = E._grid_points(D, extent).norm(dim=-1)
    assert hull[r < R_SPHERE].all()  # a visual hull contains the object (dilation covers pixel discretisation)
    assert tight[r < R_SPHERE - 2 * extent / D].all()
    ratio = float(tight.sum()) / float((r < R_SPHERE).sum())
    assert 0.97 < ratio < 1.3, ratio  # measured 1.01: caps left above and below, voxels lost at the rim
    assert not hull[r > 1.5 * R_SPHERE].any()
    # its projection at a carving camera and at a new one between them is the sphere's disc
    for c in [c2w[3], C.orbit_c2w(torch.tensor(22.5), torch.tensor(20.0))]:
        sil = E.project_hull(tight, extent, c, K, size, size)
        assert sil.shape == (size, size)
        assert iou(sil, sphere_masks(c[None], K, size)[0]) > 0.9
    # nearly all slack: a voxel seen inside one silhouette survives
    assert E.visual_hull(masks, c2w, K, D, extent, slack=7).sum() > hull.sum()


def test_normalised_silhouettes_ignore_position_and_scale():
    size = 96
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")

    def ellipse(cx, cy, rx, ry):
        return (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1).float()

    a, b = ellipse(30, 40, 10, 20), ellipse(60, 50, 15, 30)  # same shape, shifted and 1.5x larger
    for keep in (True, False):
        na, nb = (E.normalise_silhouette(m, 48, keep) for m in (a, b))
        assert na.shape == (48, 48) and E.soft_iou(na, nb) > 0.9
    kept = E.normalise_silhouette(a, 48, True) > 0.5
    cols, rows = kept.any(0).sum(), kept.any(1).sum()
    assert rows == 48 and abs(int(cols) - 24) <= 1  # aspect 1:2 kept
    stretched = E.normalise_silhouette(a, 48, False) > 0.5
    assert stretched.any(0).sum() == stretched.any(1).sum() == 48
    assert E.normalise_silhouette(torch.zeros(10, 10), 48) is None
    assert E.soft_iou(na, na) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def bunny_orbits():
    """Bunny at 96 px: frames 1..15 at the guess 20°, frame 0 (azimuth offset 30°) at 20°, 0° and 35°."""
    from conftest import real_object

    from hi3d.data.render import render_views

    path, res = real_object("bunny"), 96
    az = C.orbit_azimuths(16, 30.0)
    ring = render_views(path, C.orbit_c2w(az, torch.full((16,), 20.0)), C.intrinsics(res), res, res,
                        with_depth=False).rgba
    firsts = render_views(path, C.orbit_c2w(az[:1].expand(2), torch.tensor([0.0, 35.0])), C.intrinsics(res),
                          res, res, with_depth=False).rgba
    return ring, {20.0: ring[:1], 0.0: firsts[:1], 35.0: firsts[1:]}


@pytest.mark.parametrize("true_deg", [20.0, 0.0, 35.0])
def test_estimator_recovers_the_elevation_of_a_real_object(bunny_orbits, true_deg):
    ring, first = bunny_orbits
    cfg = E.ElevationConfig(grid_resolution=64)  # 3x faster than the default 96³, as accurate here
    est, scores = E.estimate_elevation(torch.cat([first[true_deg], ring[1:]]), 20.0, cfg)
    # measured 21.5, 6.0, 35.0 (the constant guess would be off by 0, 20, 15)
    assert abs(est - true_deg) <= (3.0 if true_deg == 20.0 else 8.0), est
    assert scores.shape[1] == 2 and (scores[1:, 0] > scores[:-1, 0]).all()
    assert scores[0, 0] == cfg.min_deg and scores[-1, 0] == cfg.max_deg
    assert float(scores[:, 1].max()) == float(scores[scores[:, 0] == est, 1][0])
    assert 0.5 < float(scores[:, 1].max()) <= 1.0


def test_auto_elevation_reprobes_at_the_estimate(bunny_orbits):
    """Two rounds with an ideal generator: the probe at 20° moves the estimate towards the true 35°, the
    second probe (rendered at that estimate) confirms it within the tolerance."""
    from conftest import real_object

    from hi3d.data.render import render_views

    ring, first = bunny_orbits
    calls = []

    def probe(k, elevation):
        calls.append((k, elevation))
        if k == 0:
            return torch.cat([first[35.0], ring[1:]])
        az = C.orbit_azimuths(16, 30.0)[1:]
        frames = render_views(real_object("bunny"), C.orbit_c2w(az, torch.full((15,), elevation)), C.intrinsics(96),
                              96, 96, with_depth=False).rgba
        return torch.cat([first[35.0], frames])

    cfg = E.ElevationConfig(grid_resolution=64, tolerance=5.0)
    found = E.auto_elevation(probe, cfg)
    assert calls[0] == (0, 20.0) and len(calls) == len(found["rounds"]) <= 2
    assert found["rounds"][0]["estimate"] > 25.0  # the first probe moved the estimate
    assert len(calls) == 2 and calls[1] == (1, found["rounds"][0]["estimate"])
    if found["final_round"] == 1:  # confirmed: stage 1 reuses the second probe
        assert found["elevation"] == calls[1][1] and abs(found["estimate"] - calls[1][1]) <= 5.0
    else:
        assert found["rerun_stage1"] and found["elevation"] == found["estimate"]
    assert abs(found["elevation"] - 35.0) <= 8.0, found["elevation"]


def test_no_signal_returns_the_guess():
    rgba = torch.ones(4, 32, 32, 4)
    rgba[0, ..., 3] = 0  # empty frame-0 silhouette
    est, scores = E.estimate_elevation(rgba, 17.0)
    assert est == 17.0 and scores.shape == (0, 2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from hi3d.testing import save_tiny_weights

    return save_tiny_weights(tmp_path_factory.mktemp("weights"), text_to_image=False)


@pytest.fixture(scope="module")
def spider_image(tmp_path_factory):
    from conftest import real_object

    from hi3d.data.render import render_views
    from hi3d.io import save_png

    view = render_views(real_object("spider"), C.orbit_c2w(torch.tensor([30.0]), torch.tensor([20.0])),
                        C.intrinsics(96), 96, 96)
    out = tmp_path_factory.mktemp("input") / "spider.png"
    save_png(out, view.rgba[0])
    return out


def _generate(*args):
    return main(["generate", *[str(a) for a in args]])


FAST = ["stage1_steps=2", "auto_elevation.grid_resolution=32", "auto_elevation.coarse_step=5",
        "auto_elevation.fine_step=2.5", "auto_elevation.hull_image_size=32"]


def test_generate_elevation_auto_records_the_estimate_and_resumes(tmp_path, weights, spider_image):
    out = tmp_path / "rerun"
    args = [spider_image, "--out", out, "--weights", weights, "--stages", "stage1", "--elevation", "auto",
            "auto_elevation.tolerance=0", *FAST]
    assert _generate(*args) == 0
    record = json.loads((out / "elevation.json").read_text())
    rounds = record["rounds"]
    assert record["guess"] == 20.0 and record["signal"] and 1 <= len(rounds) <= 2
    assert rounds[0]["probe"] == 20.0 and record["estimate"] == rounds[-1]["estimate"]
    for k, r in enumerate(rounds):  # each round's probe orbit at its elevation: the guess, then the last estimate
        assert k == 0 or r["probe"] == rounds[k - 1]["estimate"]
        assert len(r["scores"]) >= 15 and max(v for _, v in r["scores"]) > 0
        torch.testing.assert_close(load_orbit(out / f"elevation_probe/round_{k}").elevation_deg,
                                   torch.full((4,), r["probe"], dtype=torch.float64))
    if record["final_round"] is None:  # the last estimate moved: stage 1 re-run at it
        assert record["rerun_stage1"] and len(rounds) == 2 and record["elevation"] == record["estimate"]
    else:  # tolerance 0: the last estimate equals its probe's elevation
        assert record["elevation"] == record["estimate"] == rounds[-1]["probe"]
    s1 = load_orbit(out / "stage1")
    torch.testing.assert_close(s1.elevation_deg, torch.full((4,), record["elevation"], dtype=torch.float64))
    run = json.loads((out / "run.json").read_text())
    assert run["elevation"] == record and not run["stages"]["elevation"]["skipped"]
    assert run["config"]["auto_elevation"]["enabled"]
    status = json.loads((out / "status.json").read_text())
    assert status["elevation"] == record["elevation"] and status["elevation_estimate"] == record["estimate"]
    assert status["elevation_guess"] == 20.0

    # re-running reuses the recorded estimate and skips finished stages
    times = [(out / p).stat().st_mtime_ns for p in ("elevation.json", "stage1/cameras.json")]
    assert _generate(*args[:-len(FAST) - 1], "auto_elevation.tolerance=0") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["stages"]["elevation"]["skipped"] and run["stages"]["stage1/seed_0"]["skipped"]
    assert [(out / p).stat().st_mtime_ns for p in ("elevation.json", "stage1/cameras.json")] == times


def test_generate_elevation_auto_within_tolerance_reuses_the_probe(tmp_path, weights, spider_image):
    out = tmp_path / "keep"
    assert _generate(spider_image, "--out", out, "--weights", weights, "--stages", "stage1", "--elevation", "auto",
                     "auto_elevation.tolerance=90", *FAST) == 0
    record = json.loads((out / "elevation.json").read_text())
    assert record["elevation"] == 20.0 and not record["rerun_stage1"] and record["final_round"] == 0
    assert json.loads((out / "run.json").read_text())["stages"]["stage1/seed_0"]["from_probe"]
    for i in range(4):
        frame = f"rgba/{i:03d}.png"
        assert (out / "stage1" / frame).read_bytes() == (out / "elevation_probe/round_0" / frame).read_bytes()


@pytest.mark.parametrize("value, message", [("abc", "--elevation must be a number of degrees or 'auto', got 'abc'"),
                                            ("95", "between -90 and 90")])
def test_bad_elevation_is_a_clear_error(tmp_path, weights, spider_image, capsys, value, message):
    assert _generate(spider_image, "--out", tmp_path / "o", "--weights", weights, "--elevation", value) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
