import numpy as np
import pytest
import trimesh

from hi3d.data.mesh_io import load_world_mesh
from hi3d.eval import metrics


def test_chamfer_concentric_spheres():
    s1 = trimesh.creation.icosphere(4, radius=0.3)
    s2 = trimesh.creation.icosphere(4, radius=0.45)
    cd = metrics.chamfer_distance(s1, s2, num_points=20_000)
    assert cd == pytest.approx(0.15, rel=0.02)
    assert metrics.chamfer_distance(s1, s1, num_points=20_000) < 0.01


def test_chamfer_and_fscore_deterministic():
    s1 = trimesh.creation.icosphere(3, radius=0.3)
    s2 = trimesh.creation.box((0.5, 0.4, 0.3))
    a = metrics.chamfer_distance(s1, s2, num_points=5000, seed=3)
    assert a == metrics.chamfer_distance(s1, s2, num_points=5000, seed=3)
    assert a != metrics.chamfer_distance(s1, s2, num_points=5000, seed=4)
    f = metrics.f_score(s1, s1, threshold=0.02, num_points=5000)
    assert f["f_score"] > 0.99
    far = s1.copy()
    far.apply_translation([0.3, 0, 0])
    assert metrics.f_score(s1, far, threshold=0.02, num_points=5000)["f_score"] < 0.2


def test_volume_iou_offset_cubes():
    a = trimesh.creation.box((0.5, 0.5, 0.5))
    b = a.copy()
    b.apply_translation([0.1, 0.05, 0.0])
    inter = 0.4 * 0.45 * 0.5
    exact = inter / (2 * 0.125 - inter)
    assert metrics.volume_iou(a, b) == pytest.approx(exact, abs=0.02)
    assert metrics.volume_iou(a, b) == metrics.volume_iou(a, b)
    # disjoint cubes
    c = a.copy()
    c.apply_translation([0.6, 0, 0])
    assert metrics.volume_iou(a, c) == 0.0


def test_occupancy_sphere_volume_and_open_mesh():
    s = trimesh.creation.icosphere(4, radius=0.4)
    bounds = np.array([[-0.5] * 3, [0.5] * 3])
    occ = metrics.occupancy(s, bounds, 64)
    assert occ.mean() == pytest.approx(4 / 3 * np.pi * 0.4 ** 3, rel=0.03)
    # cut a hole (drop 2% of faces): ray voting keeps the volume
    rng = np.random.default_rng(0)
    keep = rng.random(len(s.faces)) > 0.02
    holed = trimesh.Trimesh(s.vertices, s.faces[keep], process=False)
    assert not holed.is_watertight
    assert metrics.volume_iou(holed, s, bounds=bounds) > 0.98


def test_volume_iou_real_non_watertight(spider_path):
    spider = load_world_mesh(spider_path)
    assert not spider.is_watertight
    assert metrics.occupancy(spider, metrics.iou_bounds(spider)).sum() > 1000
    # same surface, different triangulation
    assert metrics.volume_iou(spider, spider.subdivide()) >= 0.98


def test_volume_iou_real_watertight_shift(bunny_path):
    bunny = load_world_mesh(bunny_path)
    shifted = bunny.copy()
    shifted.apply_translation([0.05, 0, 0])
    bigger = bunny.copy()
    bigger.apply_translation([0.15, 0, 0])
    i0, i1, i2 = (metrics.volume_iou(bunny, m) for m in (bunny, shifted, bigger))
    assert i0 == 1.0 and 1.0 > i1 > i2
