import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from conftest import real_object

from hi3d.data.mesh_io import as_trimesh, load_mesh, to_file_coords
from hi3d.data.orbit import save_orbit
from hi3d.data.render import render_views
from hi3d.eval import gso
from hi3d.eval.commands import cli as evaluate_cli

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(protocol="uniform", mesh_frame="gt", num_views=3, resolution=48, input_resolution=48, num_points=4000,
             iou_resolution=32, lpips_net="none")


def _link_obj(src: Path, dest_dir: Path) -> None:
    """GSO layout for an OBJ: model.obj plus its material and texture files beside it."""
    dest_dir.mkdir(parents=True)
    (dest_dir / "model.obj").symlink_to(src)
    for f in src.parent.iterdir():
        if f.suffix.lower() in (".mtl", ".jpg", ".png") and not (dest_dir / f.name).exists():
            (dest_dir / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def gso_root(tmp_path_factory):
    """A GSO-layout folder of real meshes made by others: bunny, spider (textured OBJ), Wuson (PLY -> OBJ)."""
    root = tmp_path_factory.mktemp("gso")
    _link_obj(real_object("bunny"), root / "bunny" / "meshes")
    spider = real_object("spider")
    (root / "spider" / "meshes").mkdir(parents=True)
    for f in ["spider.mtl", "SpiderTex.jpg", "wal67ar_small.jpg", "wal69ar_small.jpg", "drkwood2.jpg",
              "engineflare1.jpg"]:
        (root / "spider" / "meshes" / f).symlink_to(spider.parent / f)
    (root / "spider" / "meshes" / "model.obj").symlink_to(spider)
    (root / "wuson" / "meshes").mkdir(parents=True)
    trimesh.load(real_object("wuson"), process=False).export(root / "wuson" / "meshes" / "model.obj")
    return root


def _cfg(gso_root, out, pred, **kw):
    kw = {"objects": "bunny,spider,wuson", **SMALL, **kw}
    return gso.GSOConfig(gso_root=str(gso_root), out=str(out), pred_dir=str(pred), **kw)


def _write_predictions(gso_root: Path, pred: Path, cfg: gso.GSOConfig, size: float, gt_cache: Path) -> None:
    """Predictions = GT scaled by (1 + size) and shifted by size / 2 (size 0: exact GT): mesh in the GT file's
    coordinates and views rendered at the protocol cameras. The GT renders are shared (rendering is slow)."""
    for name in ("bunny", "spider", "wuson"):
        shutil.copytree(gt_cache / name, Path(cfg.out) / name)
        scene, norm = load_mesh(gso.gso_mesh_path(gso_root, name))
        if size == 0:
            shutil.copytree(gt_cache / name / "gt", pred / name / "views")
            to_file_coords(as_trimesh(scene), norm).export(pred / name / "mesh.ply")
            continue
        T = np.eye(4)
        T[:3, :3] *= 1 + size
        T[:3, 3] = [size / 2, 0, 0]
        scene.apply_transform(T)
        c2w, K = gso.protocol_cameras(cfg, cfg.resolution)
        views = render_views(scene, c2w, K, cfg.resolution, cfg.resolution, normalization=norm)
        views.azimuth_deg = torch.tensor(np.arange(cfg.num_views) * 360.0 / cfg.num_views, dtype=torch.float64)
        save_orbit(views, pred / name / "views", sheet=False)
        to_file_coords(as_trimesh(scene), norm).export(pred / name / "mesh.ply")


@pytest.fixture(scope="module")
def perturbed_runs(gso_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("gt")
    cfg = _cfg(gso_root, cache, cache)
    for name in ("bunny", "spider", "wuson"):
        gso.render_ground_truth(gso.gso_mesh_path(gso_root, name), cfg, cache / name)
    results = {}
    for size in (0.0, 0.03, 0.1):
        base = tmp_path_factory.mktemp(f"run{size}")
        cfg = _cfg(gso_root, base / "out", base / "pred")
        _write_predictions(gso_root, base / "pred", cfg, size, cache)
        results[size] = (gso.run_gso(cfg), cfg)
    return results


def test_perfect_predictions_score_perfectly(perturbed_runs):
    result, cfg = perturbed_runs[0.0]
    assert not result["failed"] and [r["object"] for r in result["rows"]] == ["bunny", "spider", "wuson"]
    for r in result["rows"]:
        assert r["volume_iou"] == 1.0 and r["f_score"] == 1.0 and r["chamfer"] < 1e-6
        assert r["psnr"] == pytest.approx(100.0) and r["ssim"] == pytest.approx(1.0)
    out = Path(cfg.out)
    assert (out / "bunny" / "gt" / "cameras.json").is_file() and (out / "bunny" / "input.png").is_file()
    table = (out / "results.csv").read_text().splitlines()
    assert table[0].split(",")[:3] == ["object", "psnr", "ssim"] and table[-1].startswith("mean,")
    assert "| **mean** |" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["mean"]["volume_iou"] == 1.0
    assert (out / "run.json").is_file()


def test_scores_worsen_monotonically_with_perturbation(perturbed_runs):
    means = [perturbed_runs[s][0]["mean"] for s in (0.0, 0.03, 0.1)]
    for a, b in zip(means, means[1:]):
        assert b["chamfer"] > a["chamfer"] and b["volume_iou"] < a["volume_iou"] and b["f_score"] <= a["f_score"]
        assert b["psnr"] < a["psnr"] and b["ssim"] < a["ssim"]
    for name in ("bunny", "spider", "wuson"):
        rows = [next(r for r in perturbed_runs[s][0]["rows"] if r["object"] == name) for s in (0.0, 0.03, 0.1)]
        assert rows[0]["chamfer"] < rows[1]["chamfer"] < rows[2]["chamfer"]
        assert rows[0]["volume_iou"] > rows[1]["volume_iou"] > rows[2]["volume_iou"]


def test_resume_skips_finished_and_reports_broken(perturbed_runs, gso_root, tmp_path):
    result, cfg = perturbed_runs[0.03]
    out = Path(cfg.out)
    before = (out / "bunny" / "metrics.json").stat().st_mtime_ns
    again = gso.run_gso(cfg)
    assert again["skipped"] == ["bunny", "spider", "wuson"]
    assert again["mean"] == result["mean"]  # identical numbers
    assert (out / "bunny" / "metrics.json").stat().st_mtime_ns == before
    # a broken object (corrupt mesh) and a missing one: logged, listed, others still scored
    (gso_root / "broken" / "meshes").mkdir(parents=True, exist_ok=True)
    (gso_root / "broken" / "meshes" / "model.obj").write_text("v 0 0 0\nf 1 2 9\n garbage")
    cfg2 = _cfg(gso_root, out, cfg.pred_dir, objects="bunny,broken,missing")
    res = gso.run_gso(cfg2)
    assert [f["object"] for f in res["failed"]] == ["broken", "missing"]
    assert [r["object"] for r in res["rows"]] == ["bunny"]
    assert (out / "broken" / "error.txt").is_file()
    assert "broken,failed" in (out / "results.csv").read_text()


def test_evaluation_is_deterministic(perturbed_runs, tmp_path):
    result, cfg = perturbed_runs[0.1]
    fresh = gso.GSOConfig(**{**gso.dataclasses.asdict(cfg), "out": str(tmp_path / "again")})
    for name in ("bunny", "spider", "wuson"):  # same GT renders, fresh scoring
        (tmp_path / "again" / name).mkdir(parents=True)
        shutil.copytree(Path(cfg.out) / name / "gt", tmp_path / "again" / name / "gt")
        shutil.copy(Path(cfg.out) / name / "input.png", tmp_path / "again" / name / "input.png")
    assert gso.run_gso(fresh)["rows"] == result["rows"]


def test_eval_gso_script(perturbed_runs, tmp_path, capsys):
    _, cfg = perturbed_runs[0.0]
    shutil.copytree(Path(cfg.out) / "wuson", tmp_path / "o" / "wuson", ignore=shutil.ignore_patterns("metrics.json"))
    args = [sys.executable, str(REPO / "scripts" / "eval_gso.py"), "--gso-root", cfg.gso_root, "--pred", cfg.pred_dir,
            "--objects", "wuson", "--out", str(tmp_path / "o")] + [f"{k}={v}" for k, v in SMALL.items()]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["mean"]["volume_iou"] == 1.0
    main = runpy.run_path(str(REPO / "scripts" / "eval_gso.py"))["main"]
    assert main(["--gso-root", str(tmp_path / "nope")]) == 2
    assert "GSO folder not found" in capsys.readouterr().err
    assert main(["--gso-root", cfg.gso_root, "align=procrustes"]) == 2
    assert "align 'procrustes' unknown" in capsys.readouterr().err


def test_evaluate_command_prints_json(perturbed_runs, gso_root, capsys):
    _, cfg = perturbed_runs[0.1]
    pred = Path(cfg.pred_dir)
    assert evaluate_cli(["mesh", "--pred", str(pred / "bunny" / "mesh.ply"), "--gt", str(gso.gso_mesh_path(gso_root, "bunny")),
                         "--protocol", "uniform", "--frame", "gt", "--num-points", "3000"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert 0 < m["volume_iou"] < 1 and m["chamfer"] > 0.01 and m["protocol"] == "uniform"
    gt_views = Path(cfg.out) / "bunny" / "gt"
    assert evaluate_cli(["views", "--pred", str(pred / "bunny" / "views"), "--gt", str(gt_views), "--lpips", "",
                         "--protocol", "uniform"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert 5 < v["psnr"] < 60 and 0 < v["ssim"] < 1
    with pytest.raises(gso.Hi3DError, match="no frame record"):  # a mesh without a record needs --frame
        evaluate_cli(["mesh", "--pred", str(pred / "bunny" / "mesh.ply"), "--gt", str(gso.gso_mesh_path(gso_root, "bunny"))])
    with pytest.raises(gso.Hi3DError, match="uniform only"):
        evaluate_cli(["mesh", "--pred", str(pred / "bunny" / "mesh.ply"), "--gt", str(gso.gso_mesh_path(gso_root, "bunny")),
                      "--num-points", "10"])


def test_method_plugin_and_errors(gso_root, tmp_path):
    class Oracle:
        """A method returning the GT mesh itself (exercises the Method hook without a folder)."""

        name = "oracle"

        def predict(self, input_rgba, elevation, out_dir, object_name):
            assert input_rgba.shape == (48, 48, 4) and elevation == 30.0
            return None, gso.gso_mesh_path(gso_root, object_name)

    cfg = _cfg(gso_root, tmp_path / "o", tmp_path, objects="wuson")
    res = gso.run_gso(cfg, method=Oracle())
    assert res["method"] == "oracle" and res["rows"][0]["volume_iou"] == 1.0 and "psnr" not in res["rows"][0]
    with pytest.raises(gso.Hi3DError, match="unknown"):
        gso.make_method(gso.GSOConfig(method="nonsense"))
    with pytest.raises(gso.Hi3DError, match="prediction folder not found"):
        gso.make_method(gso.GSOConfig(pred_dir=str(tmp_path / "none")))
    assert gso.read_object_list(str(REPO / "configs" / "eval" / "gso30.txt"))[:3] == ["alarm", "backpack", "bell"]
    assert len(gso.read_object_list(str(REPO / "configs" / "eval" / "gso30.txt"))) == 30


def test_generate_method_scores_generated_meshes_in_their_frame(gso_root, tmp_path):
    """scripts/eval_gso.py method=hi3d: the real tiny pipeline (random weights, `hi3d generate` in its child
    process) on a GSO-layout folder, syncdreamer protocol. The generated mesh is scored in the frame of the
    orbit it was reconstructed from (stage 2's normalisation, identity for generations), which an independent
    recomputation from the mesh file and that orbit's cameras.json confirms; the GT frame is rebuilt by hand
    (norm_coords of the raw vertices, then SyncDreamer's camera-0-on-+X frame into hi3d's, -90° about Z)."""
    from omegaconf import OmegaConf

    from hi3d.data.mesh_io import load_scene, load_world_mesh, read_frame
    from hi3d.data.orbit import load_orbit
    from hi3d.eval import syncdreamer
    from hi3d.testing import save_tiny_weights

    weights = save_tiny_weights(tmp_path / "weights")
    fast = ["recon.gaussians.iterations=20", "recon.gaussians.num_points=500", "recon.gaussians.train_resolution=64",
            "recon.gaussians.hull_resolution=24", "recon.neus.iterations=20", "recon.neus.batch_rays=128",
            "recon.neus.num_samples=16", "recon.neus.num_importance=16", "recon.neus.eikonal_points=256",
            "recon.mesh.resolution=32", "recon.turntable_views=2", "recon.turntable_resolution=32"]
    config = tmp_path / "eval.yaml"
    config.write_text(OmegaConf.to_yaml({"lpips_net": "none", "method_options": {
        "args": ["--weights", str(weights), "--num-interp", "2", "--seed", "3", *fast], "views_dirs": []}}))
    main = runpy.run_path(str(REPO / "scripts" / "eval_gso.py"))["main"]
    out = tmp_path / "o"
    assert main(["--gso-root", str(gso_root), "--objects", "wuson", "--out", str(out), "--method", "hi3d",
                 "--config", str(config)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    pred = out / "wuson" / "pred"
    mesh = pred / "recon" / "mesh.glb"
    assert set(row) == {"object", "status", "chamfer", "volume_iou", "process"} and row["chamfer"] > 0
    orbit = load_orbit(pred / "stage2", load_depth=False)
    np.testing.assert_allclose(read_frame(mesh), orbit.normalization.numpy())  # recorded beside the mesh
    world = load_world_mesh(mesh, orbit.normalization)  # the frame it was generated in
    raw = as_trimesh(load_scene(gso.gso_mesh_path(gso_root, "wuson")))
    lo, hi = raw.vertices.min(0), raw.vertices.max(0)
    v = (raw.vertices - (lo + hi) / 2) / (hi - lo).max()  # norm_coords; wuson is not in the turn table
    gt = trimesh.Trimesh(np.stack([v[:, 1], -v[:, 0], v[:, 2]], 1), raw.faces, process=False)
    expected = syncdreamer.mesh_metrics(world, gt)
    assert row["chamfer"] == pytest.approx(expected["chamfer"], rel=1e-9)
    assert row["volume_iou"] == pytest.approx(expected["volume_iou"], rel=1e-9)
    md = (out / "results.md").read_text()
    assert "| Hi3D (published, Table 2) | 0.0172 | 0.6631 |" in md and "protocol syncdreamer" in md
    assert "| SyncDreamer (published, Table 1) | 20.05 | 0.798 | 0.146 |" in md


def test_generate_method_child_process_failure(tmp_path):
    """Without a usable pipeline (no weights), 'hi3d generate' fails in its child process: one clear error."""
    with pytest.raises(gso.Hi3DError, match="generate.log"):
        gso.GenerateMethod().predict(torch.ones(16, 16, 4), 30.0, tmp_path / "pred", "thing")
    assert (tmp_path / "pred" / "generate.log").stat().st_size > 0


def test_objects_dealt_across_two_processes_and_resumed_with_one(perturbed_runs, tmp_path):
    """`accelerate launch --num_processes 2 scripts/eval_gso.py` with predictions read from a folder: the same
    table as the one-process run, the objects split between the ranks; after losing rank 1's object (and a
    half-written record), one process scores exactly that object again."""
    from conftest import accelerate_launch_two_cpu

    result, cfg = perturbed_runs[0.1]
    two = tmp_path / "two"
    for name in ("bunny", "spider", "wuson"):  # the same GT renders (as in test_evaluation_is_deterministic)
        shutil.copytree(Path(cfg.out) / name / "gt", two / name / "gt")
        shutil.copy(Path(cfg.out) / name / "input.png", two / name / "input.png")
    args = ["--gso-root", cfg.gso_root, "--pred", cfg.pred_dir, "--objects", "bunny,spider,wuson", "--out", str(two),
            *[f"{k}={v}" for k, v in SMALL.items()]]
    proc = accelerate_launch_two_cpu([str(REPO / "scripts" / "eval_gso.py"), *args], timeout=300)
    assert json.loads(proc.stdout)["mean"] == result["mean"]  # printed once, by the main process
    assert (two / "results.csv").read_text() == (Path(cfg.out) / "results.csv").read_text()
    rows = json.loads((two / "results.json").read_text())["rows"]
    assert [{k: v for k, v in r.items() if k != "process"} for r in rows] == \
        [{k: v for k, v in r.items() if k != "process"} for r in result["rows"]]
    assert {r["object"]: r["process"] for r in rows} == {"bunny": 0, "spider": 1, "wuson": 0}  # dealt by index
    logs = [json.loads((two / "shards" / f"eval-gso-shard000{r}-of-0002.json").read_text()) for r in (0, 1)]
    assert [lg["ran"] for lg in logs] == [["bunny", "wuson"], ["spider"]]
    # rank 1 killed before spider's record was renamed into place
    stamp = (two / "bunny" / "metrics.json").stat().st_mtime_ns
    (two / "spider" / "metrics.json").rename(two / "spider" / ".metrics.json.cut.tmp.json")
    main = runpy.run_path(str(REPO / "scripts" / "eval_gso.py"))["main"]
    assert main(args) == 0
    log = json.loads((two / "shards" / "eval-gso-shard0000-of-0001.json").read_text())
    assert log["ran"] == ["spider"] and log["skipped"] == ["bunny", "wuson"]
    assert (two / "bunny" / "metrics.json").stat().st_mtime_ns == stamp
    assert json.loads((two / "spider" / "metrics.json").read_text())["process"] == 0
    assert (two / "results.csv").read_text() == (Path(cfg.out) / "results.csv").read_text()
