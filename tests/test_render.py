"""Orbit renderer (hi3d.data.render), ``hi3d render-orbit`` and the dataset builder, on real meshes."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh

from hi3d import cameras
from hi3d.cli import main
from hi3d.data import dataset_builder as db
from hi3d.data.mesh_io import as_trimesh, load_mesh, load_scene
from hi3d.data.orbit import load_orbit
from hi3d.data.render import RenderConfig, render_orbit, render_views, sample_elevation
from hi3d.errors import Hi3DError


@pytest.fixture(scope="module")
def sphere_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sphere") / "sphere.ply"
    trimesh.creation.icosphere(subdivisions=5, radius=0.7).export(path)
    return path


def analytic_sphere(c2w, K, W, H, center, radius):
    """Camera-z depth [H, W] of the ray-sphere hit through each pixel centre (0 on a miss), and the hit points."""
    o, d = cameras.get_rays(c2w, K, W, H, dtype=torch.float64)
    oc = o - center
    b = (oc * d).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - radius**2)
    hit = disc > 0
    t = -b - disc.clamp_min(0).sqrt()
    depth = torch.where(hit, t * (d @ c2w[:3, 2]), torch.zeros_like(t))
    return depth, o + d * t[..., None]


def erode(mask, px=1):
    k = 2 * px + 1
    return -F.max_pool2d(-mask.float()[None, None], k, 1, px)[0, 0] > 0.5


def test_unit_sphere_mask_depth_normals(sphere_path):
    W = 256
    c2w = cameras.orbit_c2w(torch.tensor([0.0, 135.0]), torch.tensor([20.0, -10.0]), 1.5)
    K = cameras.intrinsics(W, W, cameras.DEFAULT_FOV_DEG)
    orbit = render_views(sphere_path, c2w, K, W, W)
    N = orbit.normalization
    scale = float(torch.linalg.det(N[:3, :3]).abs() ** (1 / 3))
    center, radius = N[:3, 3], 0.7 * scale  # the icosphere's bounding box is normalised to the unit cube
    assert 0.49 < radius < 0.51 and center.abs().max() < 0.01
    for i in range(len(c2w)):
        ref, points = analytic_sphere(c2w[i], K, W, W, center, radius)
        hit, mask = ref > 0, orbit.mask[i]
        iou = float((hit & mask).sum() / (hit | mask).sum())
        assert iou > 0.99, iou
        depth = orbit.depth[i].double()
        both = hit & (depth > 0)
        assert both.sum() > 0.99 * hit.sum()
        err = (depth - ref).abs()
        inner = erode(hit) & erode(depth > 0)
        assert err[inner].max() < 0.01 * radius, float(err[inner].max())  # acceptance: < 1% of the radius
        assert err[both].mean() < 0.001 * radius, float(err[both].mean())
        assert (depth[~hit & ~mask] == 0).all() and (orbit.rgba[i][~mask & (orbit.rgba[i, ..., 3] == 0)][:, :3] == 1).all()
        radial = F.normalize(points - center, dim=-1)
        cos = (orbit.normal[i].double() * radial).sum(-1)[inner]
        angle = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))
        assert angle.mean() < 1.0 and torch.quantile(angle, 0.99) < 3.0, (float(angle.mean()), float(angle.max()))


def test_projected_point_lands_on_its_rendered_pixel(bunny_path):
    """A small red marker on the bunny's surface, at a non-square image with an off-centre principal
    point: the centroid of its pixels is where cameras.project puts it."""
    bunny = as_trimesh(load_mesh(bunny_path)[0])  # world coordinates
    W, H = 320, 240
    K = torch.tensor([[300.0, 0, 150.0], [0, 300.0, 130.0], [0, 0, 1]], dtype=torch.float64)
    c2w = cameras.orbit_c2w(torch.tensor([30.0, 250.0]), torch.tensor([25.0, -5.0]), 1.4)
    for i in range(len(c2w)):
        uv, z = cameras.project(torch.as_tensor(bunny.vertices), c2w[i], K)
        inside = (uv > 20).all(-1) & (uv[:, 0] < W - 20) & (uv[:, 1] < H - 20)
        v = int(torch.argmin(torch.where(inside, z, torch.inf)))  # the vertex nearest the camera is visible
        center = bunny.vertices[v] + 0.015 * bunny.vertex_normals[v]
        marker = trimesh.creation.icosphere(subdivisions=2, radius=0.008)
        marker.apply_translation(center)
        marker.visual = trimesh.visual.ColorVisuals(marker, vertex_colors=[255, 0, 0, 255])
        s = trimesh.Scene([bunny, marker])
        orbit = render_views(s, c2w[i:i + 1], K, W, H, shading="flat")
        rgb = orbit.rgba[0, ..., :3]
        red = (rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.3) & (orbit.rgba[0, ..., 3] > 0.99)
        assert red.sum() > 10
        rows, cols = torch.nonzero(red, as_tuple=True)
        centroid = torch.stack([cols.double().mean() + 0.5, rows.double().mean() + 0.5])
        uv, zc = cameras.project(torch.as_tensor(center), c2w[i], K)
        assert (centroid - uv).norm() < 1.0, (centroid, uv)
        # the depth at the marker's pixel is the marker's front surface
        j, r = int(uv[0]), int(uv[1])
        assert abs(float(orbit.depth[0, r, j]) - (float(zc) - 0.008)) < 0.004


def _strip_textures(scene):
    out = scene.copy()
    for g in out.geometry.values():
        g.visual = trimesh.visual.TextureVisuals(uv=g.visual.uv, material=trimesh.visual.material.SimpleMaterial(
            diffuse=g.visual.material.diffuse))
    return out


def test_spider_renders_its_texture(spider_path):
    c2w = cameras.orbit_c2w(torch.tensor([0.0]), torch.tensor([20.0]), 1.5)
    K = cameras.intrinsics(128)
    scene, norm = load_mesh(spider_path)
    textured = render_views(scene, c2w, K, 128, 128, normalization=norm, shading="flat")
    plain = render_views(_strip_textures(scene), c2w, K, 128, 128, normalization=norm, shading="flat")
    assert torch.equal(textured.mask, plain.mask)
    m = textured.mask[0] & (textured.rgba[0, ..., 3] > 0.99)
    tex, flat = textured.rgba[0, ..., :3][m], plain.rgba[0, ..., :3][m]
    assert (tex - flat).abs().mean() > 0.2  # the textures are dark, the bare materials light grey
    distinct = lambda c: len(torch.unique((c * 255).round(), dim=0))  # noqa: E731
    assert distinct(flat) <= 16 and distinct(tex) > 10 * distinct(flat), (distinct(flat), distinct(tex))  # texels
    # flat shading shows the texels: the spider's pixels have the colours of its (dark brown) textures
    texels = np.concatenate([np.asarray(g.visual.material.image.convert("RGB")).reshape(-1, 3) / 255.0
                             for g in load_scene(spider_path).geometry.values()])
    assert abs(float(tex.mean()) - texels.mean()) < 0.15


def test_glb_round_trip_matches_obj(spider_path, tmp_path):
    """The same asset as OBJ and as GLB (both +Y up) renders the same orbit."""
    glb = tmp_path / "spider.glb"
    load_scene(spider_path).export(glb)
    cfg = RenderConfig(num_views=3, resolution=96, elevation=30.0)
    a, b = render_orbit(spider_path, cfg), render_orbit(glb, cfg)
    assert torch.allclose(a.normalization, b.normalization, atol=1e-6)
    iou = (a.mask & b.mask).sum() / (a.mask | b.mask).sum()
    assert iou > 0.99
    both = a.mask & b.mask & (a.rgba[..., 3] > 0.99) & (b.rgba[..., 3] > 0.99)
    assert (a.rgba[..., :3] - b.rgba[..., :3]).abs()[both].mean() < 0.03
    assert (a.depth - b.depth).abs()[(a.depth > 0) & (b.depth > 0)].median() < 1e-3


def test_cli_writes_orbit_layout(bunny_path, tmp_path, capsys):
    out = tmp_path / "orbit"
    rc = main(["render-orbit", str(bunny_path), "--out", str(out), "--num-views", "4", "--resolution", "64",
               "--elevation", "random", "--seed", "3", "--azimuth-offset", "10"])
    assert rc == 0
    for name in ["contact_sheet.png", "run.json", "config.yaml", "cameras.json", "rgba/003.png", "depth/003.npy",
                 "normal/003.png"]:
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "render-orbit" and run["config"]["seed"] == 3 and run["end_time"]
    assert run["stages"]["render"]["views"] == 4
    orbit = load_orbit(out)
    el = sample_elevation(3)
    assert -10 <= el <= 40 and torch.allclose(orbit.elevation_deg, torch.full((4,), el, dtype=torch.float64))
    c2w, az, _ = cameras.orbit_poses(4, el, 1.5, 10.0)
    assert torch.allclose(orbit.c2w, c2w) and torch.allclose(orbit.azimuth_deg, az)
    assert torch.allclose(orbit.K[0], cameras.intrinsics(64))
    assert orbit.depth.shape == (4, 64, 64) and (orbit.depth[orbit.mask] > 0).float().mean() > 0.97
    _, norm = load_mesh(bunny_path)
    assert np.allclose(orbit.normalization.numpy(), norm)


def test_random_elevation_is_seeded_and_in_range():
    els = [sample_elevation(s) for s in range(300)]
    assert all(-10 <= e <= 40 for e in els) and min(els) < -5 and max(els) > 35
    assert sample_elevation(7) == sample_elevation(7) != sample_elevation(8)
    cfg = RenderConfig(random_elevation=True, seed=7)
    from hi3d.data.render import resolve_elevation
    assert resolve_elevation(cfg) == sample_elevation(7) and resolve_elevation(RenderConfig(elevation=12.5)) == 12.5


def _bad_inputs(tmp_path):
    (tmp_path / "empty.obj").write_text("")
    (tmp_path / "corrupt.glb").write_bytes(b"glTF\x02\x00\x00\x00" + b"\x07garbage" * 8)
    (tmp_path / "nan.obj").write_text("v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (tmp_path / "inf.obj").write_text("v 0 0 0\nv 1 inf 0\nv 0 1 0\nf 1 2 3\n")
    trimesh.PointCloud(np.random.default_rng(0).random((50, 3))).export(tmp_path / "points.ply")
    return {"missing.obj": "not found", "empty.obj": "empty", "corrupt.glb": "cannot read",
            "nan.obj": "NaN", "inf.obj": "NaN or Inf", "points.ply": "no triangle faces"}


def test_bad_inputs_give_one_line_errors(tmp_path, capsys, bunny_path):
    for name, words in _bad_inputs(tmp_path).items():
        with pytest.raises(Hi3DError, match=words):
            render_orbit(tmp_path / name, RenderConfig(num_views=1, resolution=16))
        out = tmp_path / ("out_" + name)
        rc = main(["render-orbit", str(tmp_path / name), "--out", str(out), "--resolution", "16"])
        err = capsys.readouterr().err
        assert rc != 0 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists()  # nothing written for a bad input
    rc = main(["render-orbit", str(bunny_path), "--out", str(tmp_path / "k"), "resolutoin=32"])
    err = capsys.readouterr().err
    assert rc != 0 and "unknown config key 'resolutoin'" in err and "resolution" in err
    assert len(err.strip().splitlines()) == 1
    rc = main(["render-orbit", str(bunny_path), "--out", str(tmp_path / "e"), "--elevation", "high"])
    assert rc != 0 and "--elevation" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# dataset builder
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def assets(tmp_path, wuson_path):
    root = tmp_path / "assets"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    trimesh.creation.icosphere(subdivisions=2).export(root / "a" / "ball.obj")
    trimesh.creation.box(extents=(1, 2, 0.5)).export(root / "b" / "box.glb")
    trimesh.creation.cylinder(radius=0.3, height=1.0).export(root / "b" / "can.stl")
    (root / "b" / "broken.ply").write_text("ply\nformat ascii 1.0\nelement vertex 3\nend_header\n1 2\n")
    (root / "wuson.ply").symlink_to(wuson_path)
    return root


def test_sharding_partitions_and_seeds_do_not_depend_on_it():
    for n in (1, 2, 3, 7):
        parts = [db.shard_indices(10, i, n) for i in range(n)]
        assert sorted(sum(parts, [])) == list(range(10))
    with pytest.raises(Hi3DError):
        db.shard_indices(10, 3, 3)
    assert db.object_seed(0, "abc") == db.object_seed(0, "abc") != db.object_seed(1, "abc")
    paths = [db.Path("x/a/model.obj"), db.Path("x/b/model.obj"), db.Path("x/c/uid.glb")]
    assert db.object_ids(paths) == ["x__a__model", "x__b__model", "uid"]


def test_dataset_builder_shards_resumes_and_logs_broken_assets(assets, tmp_path):
    files = db.list_assets(assets)
    assert [p.name for p in files] == ["ball.obj", "box.glb", "broken.ply", "can.stl", "wuson.ply"]
    listing = tmp_path / "list.txt"
    listing.write_text("# assets\n" + "\n".join(str(p.relative_to(tmp_path)) for p in files) + "\n\n")
    assert db.list_assets(listing) == files
    cfg = RenderConfig(num_views=2, resolution=24, random_elevation=True, normals=False)
    out = tmp_path / "data"
    logs = []
    c0 = db.build_dataset(files, out, cfg, seed=5, shard=0, num_shards=2, log=logs.append)
    c1 = db.build_dataset(files, out, cfg, seed=5, shard=1, num_shards=2, log=logs.append)
    assert c0["done"] + c1["done"] == 4 and c0["failed"] + c1["failed"] == 1
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    ok = {r["id"]: r for r in lines if r["status"] == "ok"}
    assert set(ok) == {"ball", "box", "can", "wuson"}
    assert [r["id"] for r in lines if r["status"] == "error"] == ["broken"]
    assert "broken.ply" in (out / "errors" / "broken.log").read_text()
    for oid, rec in ok.items():
        orbit = load_orbit(out / oid)
        assert len(orbit) == 2 and orbit.width == 24 and orbit.mask.any()
        el = sample_elevation(db.object_seed(5, oid))
        assert -10 <= el <= 40 and rec["elevation_deg"] == pytest.approx(el)
        assert torch.allclose(orbit.elevation_deg, torch.tensor([el, el], dtype=torch.float64))
    # resume: finished objects are skipped, a partial one (no cameras.json) is redone
    (out / "can" / "cameras.json").unlink()
    stamp = (out / "ball" / "cameras.json").stat().st_mtime_ns
    again = db.build_dataset(files, out, cfg, seed=5, log=logs.append)
    assert again == {"done": 1, "skipped": 3, "failed": 1}
    assert (out / "ball" / "cameras.json").stat().st_mtime_ns == stamp and db.is_complete(out / "can", 2)
    # the script: same run again skips everything, exits non-zero because one asset is broken
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("render_orbits", db.Path(__file__).parent.parent / "scripts" / "render_orbits.py")
    script = module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(listing), "--out", str(out), "--shard", "0", "--num-shards", "1", "--seed", "5",
                        "num_views=2", "resolution=24", "normals=false"]) == 1
    assert (out / "run.json").is_file()
    ids = [json.loads(x)["id"] for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert ids.count("ball") == 1 and ids.count("can") == 2  # redone 'can' listed again, skipped ones not


def test_render_configs_load():
    from pathlib import Path

    from hi3d.config import load_config
    for path in sorted((Path(__file__).parent.parent / "configs" / "render").glob("*.yaml")):
        cfg = load_config(RenderConfig, path)
        assert cfg.num_views == 16 and cfg.radius == 1.5 and cfg.fov == pytest.approx(49.1) and cfg.random_elevation


def test_missing_gl_library_is_one_clear_line(tmp_path, bunny_path):
    import ctypes.util
    import os
    import subprocess
    import sys

    if ctypes.util.find_library("OSMesa"):
        pytest.skip("OSMesa is installed: cannot simulate a missing GL library with it")
    env = {**os.environ, "PYOPENGL_PLATFORM": "osmesa"}
    p = subprocess.run([sys.executable, "-m", "hi3d.cli", "render-orbit", str(bunny_path), "--out", str(tmp_path / "o")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert "apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri" in p.stderr and not (tmp_path / "o").exists()
