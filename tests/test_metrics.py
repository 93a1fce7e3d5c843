import numpy as np
import pytest
import torch
import trimesh

from hi3d.data.mesh_io import load_world_mesh
from hi3d.errors import Hi3DError
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


def test_psnr_known_mse():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 16, 16, 3, generator=g) * 0.8 + 0.1
    b = a + 0.05 * torch.sign(torch.rand(a.shape, generator=g) - 0.5)  # MSE = 0.0025 exactly
    assert torch.allclose(metrics.psnr(b, a), torch.full((2,), 10 * np.log10(1 / 0.0025), dtype=torch.float64))
    assert metrics.psnr(a, a)[0] == pytest.approx(100.0)


def test_ssim_identical_and_reference():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 24, 20, 3, generator=g)
    b = (a + 0.2 * torch.rand(a.shape, generator=g)).clamp(0, 1)
    assert metrics.ssim(a, a)[0] == pytest.approx(1.0, abs=1e-12)
    fast = metrics.ssim(a, b)[0].item()
    ref = metrics.ssim_reference(a[0].numpy(), b[0].numpy())
    assert fast == pytest.approx(ref, abs=1e-10)
    assert 0 < fast < 0.99


def test_lpips_loads_local_backbone_file(tmp_path):
    g = torch.Generator().manual_seed(2)
    # a torchvision-style checkpoint ("features.<i>.weight") with random values
    shapes = metrics.LPIPS("alex", random_backbone=True).model.net.state_dict()
    state = {"features." + k.split(".", 1)[1]: torch.randn(v.shape, generator=g) * 0.05 for k, v in shapes.items()}
    state["classifier.1.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "alex.pth")
    model = metrics.LPIPS("alex", weights=tmp_path / "alex.pth")
    assert torch.equal(model.model.net.slice1[0].weight, state["features.0.weight"])
    a = torch.rand(2, 64, 64, 3, generator=g)
    b = torch.rand(2, 64, 64, 3, generator=g)
    assert model(a, a).abs().max() < 1e-6
    d = model(a, b)
    assert d.shape == (2,) and (d > 0).all()
    assert (model(a, (a + 0.3 * b).clamp(0, 1)) < d).all()


def test_lpips_missing_weights_clear_error(tmp_path):
    with pytest.raises(Hi3DError, match="vgg16-397923af.pth"):
        metrics.LPIPS("vgg", weights=tmp_path / "nothing.pth")


@pytest.mark.weights
def test_lpips_real_vgg():
    model = metrics.LPIPS("vgg")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 64, 64, 3, generator=g)
    assert model(a, a)[0] < 1e-6 and model(a, torch.rand(1, 64, 64, 3, generator=g))[0] > 0.1


def _tiny_clip():
    import open_clip

    model = open_clip.CLIP(embed_dim=16, vision_cfg={"layers": 1, "width": 32, "patch_size": 8, "image_size": 32,
                                                     "head_width": 16},
                           text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    preprocess = open_clip.image_transform(32, is_train=False)
    return model, preprocess, open_clip.SimpleTokenizer(context_length=16)


def test_clip_similarity_tiny_model():
    torch_gen = torch.Generator().manual_seed(0)
    model, preprocess, tok = _tiny_clip()
    scorer = metrics.ClipScorer(model, preprocess, tok)
    img = torch.rand(32, 32, 3, generator=torch_gen)
    views = torch.stack([img, torch.rand(32, 32, 3, generator=torch_gen)])
    sim = scorer.similarity(img, views)
    assert sim[0] == pytest.approx(1.0, abs=1e-6) and sim[1] < sim[0]
    t = scorer.similarity("a red chair", views)
    assert t.shape == (2,) and (t.abs() <= 1).all()
    assert metrics.clip_similarity(scorer, img, views) == pytest.approx(float(sim.mean()))


def test_clip_missing_weights_clear_error(tmp_path):
    with pytest.raises(Hi3DError, match="CLIP weights"):
        metrics.ClipScorer.from_pretrained("ViT-B-32", tmp_path / "none.bin")


def test_icp_recovers_pose_and_scale(bunny_path):
    bunny = load_world_mesh(bunny_path)
    moved = bunny.copy()
    T = trimesh.transformations.rotation_matrix(0.4, [0, 0, 1])
    T[:3, :3] *= 0.8
    T[:3, 3] = [0.05, -0.03, 0.02]
    moved.apply_transform(T)
    before = metrics.chamfer_distance(moved, bunny, num_points=10_000)
    aligned, M = metrics.align_icp(moved, bunny, num_points=3000)
    after = metrics.chamfer_distance(aligned, bunny, num_points=10_000)
    shuffled = trimesh.Trimesh(bunny.vertices, bunny.faces[np.random.default_rng(0).permutation(len(bunny.faces))])
    floor = metrics.chamfer_distance(shuffled, bunny, num_points=10_000)  # sampling noise of the metric
    assert before > 0.03 and after < 1.05 * floor
    assert np.allclose(M @ T, np.eye(4), atol=0.02)
    assert metrics.align(moved, bunny, "none") is moved
    with pytest.raises(Hi3DError):
        metrics.align(moved, bunny, "procrustes")


def test_mesh_metrics_identical_and_deterministic(wuson_path):
    w = load_world_mesh(wuson_path)
    m = metrics.mesh_metrics(w, w, num_points=5000)
    assert m["chamfer"] < 0.01 and m["iou"] == 1.0 and m["f_score"] == 1.0
    shifted = w.copy()
    shifted.apply_translation([0.03, 0, 0])
    a = metrics.mesh_metrics(shifted, w, num_points=5000)
    assert a == metrics.mesh_metrics(shifted, w, num_points=5000)
    assert a["chamfer"] > m["chamfer"] and a["iou"] < 1.0


def test_clip_from_local_checkpoint_file(tmp_path, capsys):
    """The real loading path: an open_clip model config + a checkpoint file on disk (tiny, random)."""
    import json

    import open_clip

    model, _, _ = _tiny_clip()
    cfg = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "patch_size": 8, "image_size": 32,
                                           "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "hi3d-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "hi3d-tiny-clip.json")
    torch.save(model.state_dict(), tmp_path / "tiny.bin")
    scorer = metrics.ClipScorer.from_pretrained("hi3d-tiny-clip", tmp_path / "tiny.bin")
    g = torch.Generator().manual_seed(0)
    img = torch.rand(32, 32, 3, generator=g)
    ref = metrics.ClipScorer(model, scorer.preprocess).embed_images(img)
    assert torch.allclose(scorer.embed_images(img), ref, atol=1e-6)
    # hi3d evaluate clip on an orbit folder against the image
    from hi3d import cameras
    from hi3d.data.orbit import Orbit, save_orbit
    from hi3d.eval.commands import cli as evaluate_cli
    from hi3d.io import save_png

    c2w, az, el = cameras.orbit_poses(2, 20.0)
    rgba = torch.cat([torch.stack([img, torch.rand(32, 32, 3, generator=g)]), torch.ones(2, 32, 32, 1)], -1)
    save_orbit(Orbit(rgba=rgba, c2w=c2w, K=cameras.intrinsics(32, 32).expand(2, 3, 3), azimuth_deg=az,
                     elevation_deg=el, radius=torch.full((2,), 1.5, dtype=torch.float64)), tmp_path / "views")
    save_png(tmp_path / "input.png", img)
    assert evaluate_cli(["clip", "--views", str(tmp_path / "views"), "--image", str(tmp_path / "input.png"),
                         "--model", "hi3d-tiny-clip", "--weights", str(tmp_path / "tiny.bin")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["per_view"][0] == pytest.approx(1.0, abs=1e-3) and out["per_view"][1] < out["per_view"][0]
