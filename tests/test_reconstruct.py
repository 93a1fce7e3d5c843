"""``hi3d reconstruct``: clear errors, stage outputs, resume after an interruption; the acceptance run (slow)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hi3d.cli import main
from hi3d.config import load_config
from hi3d.data.mesh_io import as_trimesh, load_scene
from hi3d.data.orbit import load_orbit, save_orbit
from hi3d.errors import Hi3DError
from hi3d.io import load_png, save_png
from hi3d.recon.reconstruct import ReconstructConfig, reconstruct

TINY = ["neus.num_levels=4", "neus.log2_hashmap_size=12", "neus.base_resolution=8", "neus.max_resolution=32",
        "neus.start_levels=4", "neus.hidden_dim=32", "neus.feature_dim=7", "neus.color_hidden_dim=32",
        "neus.num_samples=16", "neus.num_importance=8", "neus.batch_rays=128", "neus.eikonal_points=256",
        "neus.warmup_iters=2", "neus.iterations=6", "neus.checkpoint_every=3", "mesh.resolution=32",
        "turntable_views=2", "turntable_resolution=32", "gaussians.iterations=4", "gaussians.num_points=200",
        "gaussians.train_resolution=0", "gaussians.progress=false"]


@pytest.fixture(scope="module")
def tiny_orbit(tmp_path_factory):
    from hi3d.data.render import RenderConfig, render_orbit

    path = real_bunny()
    out = tmp_path_factory.mktemp("orbit")
    save_orbit(render_orbit(path, RenderConfig(num_views=4, resolution=32)), out)
    return out


def real_bunny():
    from conftest import real_object

    return real_object("bunny")


def tiny_cfg(*extra):
    return load_config(ReconstructConfig, None, TINY + list(extra))


def test_bad_inputs_give_clear_errors(tmp_path, tiny_orbit):
    with pytest.raises(Hi3DError, match="cameras.json"):
        reconstruct(tmp_path / "nothing", tmp_path / "out", 0, tiny_cfg())
    odd = tmp_path / "odd"
    shutil.copytree(tiny_orbit, odd)
    save_png(odd / "rgba" / "001.png", torch.ones(24, 32, 4))
    with pytest.raises(Hi3DError, match="inconsistent image sizes"):
        reconstruct(odd, tmp_path / "out", 0, tiny_cfg())
    white = tmp_path / "white"
    shutil.copytree(tiny_orbit, white)
    for i in range(4):
        save_png(white / "rgba" / f"{i:03d}.png", torch.ones(32, 32, 4))
    with pytest.raises(Hi3DError, match="no object"):
        reconstruct(white, tmp_path / "out", 0, tiny_cfg())
    opaque = tmp_path / "opaque"
    shutil.copytree(tiny_orbit, opaque)
    for i in range(4):
        im = load_png(opaque / "rgba" / f"{i:03d}.png")
        im[..., 3] = 1.0
        save_png(opaque / "rgba" / f"{i:03d}.png", im)
    with pytest.raises(Hi3DError, match="no alpha mask"):
        reconstruct(opaque, tmp_path / "out", 0, tiny_cfg())
    assert main(["reconstruct", str(white), "--out", str(tmp_path / "o2"), "--num-interp", "0"] + TINY) == 2
    if not torch.cuda.is_available():  # device=cuda here: refused at start-up, nothing written
        for arg in (["device=cuda"], ["--config", str(Path(__file__).parents[1] / "configs/recon/neus_high.yaml")]):
            assert main(["reconstruct", str(tiny_orbit), "--out", str(tmp_path / "o3"), *TINY, *arg]) == 2
            assert not (tmp_path / "o3").exists()


def test_interrupted_reconstruct_resumes_and_skips_finished_stages(tmp_path, tiny_orbit):
    out = tmp_path / "rec"

    def interrupt(step, losses):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reconstruct(tiny_orbit, out, 2, tiny_cfg(), progress=False, callback=interrupt)
    assert (out / "interp" / "cameras.json").is_file() and not (out / "mesh.glb").exists()
    assert torch.load(out / "neus.pt", weights_only=False)["step"] == 3

    steps = []
    files = reconstruct(tiny_orbit, out, 2, tiny_cfg(), progress=False, callback=lambda s, _: steps.append(s))
    assert steps == [3, 4, 5]
    run = json.loads((out / "run.json").read_text())
    assert run["stages"]["interpolate"]["skipped"] is True
    assert run["stages"]["neus"]["resumed_from_step"] == 3 and run["stages"]["neus"]["num_views"] == 6
    assert run["stages"]["mesh"]["skipped"] is False
    for name in ("glb", "obj", "ply", "turntable"):
        assert files[name].is_file() and files[name].stat().st_size > 0
    assert len(load_orbit(out / "interp")) == 2
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("mesh.*")}

    assert main(["reconstruct", str(tiny_orbit), "--out", str(out), "--num-interp", "2", "--no-progress"] + TINY) == 0
    run = json.loads((out / "run.json").read_text())
    assert all(run["stages"][s]["skipped"] for s in ("interpolate", "neus", "mesh", "turntable"))
    assert {p: p.stat().st_mtime_ns for p in out.glob("mesh.*")} == mtimes

    steps.clear()  # another NeuS config: NeuS, mesh and turntable are redone, the interpolation is kept
    reconstruct(tiny_orbit, out, 2, tiny_cfg("neus.lr=0.02", "neus.num_threads=1"), progress=False,
                callback=lambda s, _: steps.append(s))
    run = json.loads((out / "run.json").read_text())
    assert steps == list(range(6)) and run["stages"]["interpolate"]["skipped"] is True
    assert run["stages"]["neus"]["redone_because"] == ["config.lr"]  # thread count: not an input
    assert all(run["stages"][s]["redone_because"] == ["neus"] for s in ("mesh",))
    assert run["stages"]["turntable"]["redone_because"] == ["mesh"]


def test_changed_num_interp_redoes_neus_and_mesh(tmp_path, tiny_orbit):
    """The acceptance run: --num-interp 0, then --num-interp 16 into the same folder, then new view content."""
    out = tmp_path / "R"
    cli = ["reconstruct", str(tiny_orbit), "--out", str(out), "--no-progress"] + TINY
    assert main(cli + ["--num-interp", "0"]) == 0
    first = torch.load(out / "neus.pt", weights_only=False)["fingerprint"]
    assert first["inputs"]["num_interp"] == 0 and first["inputs"]["interpolate"] is None
    assert main(cli + ["--num-interp", "16"]) == 0
    run = json.loads((out / "run.json").read_text())
    st = run["stages"]
    assert st["interpolate"]["skipped"] is False and len(load_orbit(out / "interp")) == 16
    assert st["neus"]["skipped"] is False and st["neus"]["resumed_from_step"] == 0 and st["neus"]["num_views"] == 20
    assert st["neus"]["redone_because"] == ["interpolate", "num_interp"]
    assert st["mesh"]["skipped"] is False and st["mesh"]["redone_because"] == ["neus"]
    assert not list((out / "interp").glob("gaussians.ckpt*.pt"))
    assert main(cli + ["--num-interp", "16"]) == 0  # unchanged: every stage skipped
    st = json.loads((out / "run.json").read_text())["stages"]
    assert all(st[s]["skipped"] and "redone_because" not in st[s] for s in ("interpolate", "neus", "mesh", "turntable"))

    edited = tmp_path / "edited"  # same cameras and file names, one view's pixels changed
    shutil.copytree(tiny_orbit, edited)
    im = load_png(edited / "rgba" / "002.png")
    im[..., :3] = 1 - im[..., :3]
    save_png(edited / "rgba" / "002.png", im)
    assert main(["reconstruct", str(edited), "--out", str(out), "--no-progress", "--num-interp", "16"] + TINY) == 0
    st = json.loads((out / "run.json").read_text())["stages"]
    assert st["interpolate"]["redone_because"] == ["views"]
    assert set(st["neus"]["redone_because"]) == {"interpolate", "views"} and st["mesh"]["skipped"] is False


@pytest.mark.slow
@pytest.mark.parametrize("num_interp", [16, 0])
def test_acceptance_bunny_chamfer_and_iou(tmp_path_factory, num_interp):
    """16-view GT orbit at 256² of the Stanford bunny (+ M interpolated views) -> NeuS (CPU config) -> mesh."""
    from hi3d.data.mesh_io import load_world_mesh
    from hi3d.data.render import RenderConfig, render_orbit
    from hi3d.eval.metrics import chamfer_distance, volume_iou

    bunny = real_bunny()
    orbit_dir = tmp_path_factory.mktemp("bunny")
    orbit = render_orbit(bunny, RenderConfig(resolution=256))
    save_orbit(orbit, orbit_dir)
    out = tmp_path_factory.mktemp(f"rec{num_interp}")
    from hi3d.recon.demo import config_path

    cfg = load_config(ReconstructConfig, config_path("cpu"))
    files = reconstruct(orbit_dir, out, num_interp, cfg, progress=True)
    pred = load_world_mesh(files["ply"], orbit.normalization)
    gt = load_world_mesh(bunny, orbit.normalization)
    cd, iou = chamfer_distance(pred, gt), volume_iou(pred, gt)
    print(f"M={num_interp}: chamfer {cd:.4f} iou {iou:.3f}")
    assert cd <= 0.01 and iou >= 0.8
    source = as_trimesh(load_scene(bunny))
    for fmt in ("glb", "obj", "ply"):  # +Y up, original scale and position within 2% of the bbox
        err = (as_trimesh(load_scene(files[fmt])).bounds - source.bounds) / source.extents.max()
        # the underside (file -Y) is never seen from the elevation-20° orbit: NeuS may grow a few % there
        assert np.abs(err[1, :]).max() < 0.02 and np.abs(err[0, [0, 2]]).max() < 0.02, (fmt, err)
        assert abs(err[0, 1]) < 0.08, (fmt, err)


def test_demo_names_missing_objects_and_packages(tmp_path):
    from hi3d.recon import demo

    with pytest.raises(Hi3DError, match="neither one of bunny"):
        demo.resolve_object(str(tmp_path / "missing.obj"))
    assert demo.config_path("cpu").is_file() and demo.config_path("high").is_file()
    for quality in ("cpu", "high"):
        load_config(ReconstructConfig, demo.config_path(quality))  # the shipped YAMLs match the schema
    assert main(["demo", "--out", str(tmp_path), "--object", str(tmp_path / "nope.obj")]) == 2


def test_demo_command_end_to_end_at_a_tiny_setting(tmp_path, capsys):
    """``hi3d demo`` on the real bunny at 48², M = 2, a few steps per stage: every stage runs, the mesh is
    scored against the source, a re-run skips every finished stage."""
    real_bunny()
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--resolution", "48", "--num-interp", "2", "--no-progress",
            *TINY, "neus.iterations=40", "neus.mask_weight=0.5", "neus.lr=2e-2", "mesh.texture_size=64"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "bunny.obj: Chamfer distance" in printed and "stage times: render" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stage_seconds"]) == {"render", "interpolate", "neus", "mesh", "turntable", "evaluate"}
    # 40 NeuS steps at 48²: a coarse bunny (0.031 / 0.71 measured), far from the initial sphere (0.07 / 0.53)
    assert metrics["chamfer"] < 0.05 and metrics["volume_iou"] > 0.6
    for name in ("orbit/cameras.json", "recon/mesh.glb", "recon/mesh.obj", "recon/mesh.ply", "recon/turntable.png",
                 "run.json"):
        assert (out / name).is_file(), name
    assert len(load_orbit(out / "orbit")) == 16 and load_orbit(out / "orbit").width == 48
    assert main(args) == 0
    stages = json.loads((out / "recon" / "run.json").read_text())["stages"]
    assert all(stages[s]["skipped"] for s in ("interpolate", "neus", "mesh", "turntable"))
    run = json.loads((out / "run.json").read_text())
    assert run["stages"]["render"]["skipped"] and run["stages"]["evaluate"]["skipped"]
    assert json.loads((out / "metrics.json").read_text())["chamfer"] == metrics["chamfer"]
    assert main(["demo", "--out", str(tmp_path / "bad"), "--resolution", "8"]) == 2


THREADS = ["neus.num_threads=2", "gaussians.num_threads=2"]  # > 1: parallel reductions and scatter-adds in play


def _neus_weights(path):
    return torch.load(path, weights_only=False)["model"]


def test_identical_runs_write_identical_meshes(tmp_path, tiny_orbit):
    """Same orbit, config, seed and thread count -> bit-identical NeuS weights and mesh files (with 3DGS)."""
    cfg = tiny_cfg(*THREADS, "gaussians.iterations=12", "gaussians.densify_start=4", "gaussians.densify_every=4")
    for name in ("a", "b"):
        reconstruct(tiny_orbit, tmp_path / name, 2, cfg, progress=False)
    a, b = _neus_weights(tmp_path / "a" / "neus.pt"), _neus_weights(tmp_path / "b" / "neus.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for f in ("mesh.ply", "mesh.obj", "interp/rgba/000.png"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    stages = json.loads((tmp_path / "a" / "run.json").read_text())["stages"]
    for name in ("interpolate", "neus"):  # the thread counts the result depends on are recorded
        assert [[n for _, n in u["threads"]] for u in stages[name]["cpu_threads"]] == [[2]], name


def test_sigkill_during_neus_then_rerun_equals_uninterrupted(tmp_path, tiny_orbit):
    """A ``hi3d reconstruct`` process killed with SIGKILL after a NeuS checkpoint, re-run, writes the mesh
    of an uninterrupted run: the checkpoint carries the weights, Adam's state and the RNG state."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = TINY + THREADS + ["neus.iterations=24", "neus.checkpoint_every=4"]
    reconstruct(tiny_orbit, tmp_path / "full", 0, tiny_cfg(*args[len(TINY):]), progress=False)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(p) for p in sys.path if p])}
    proc = subprocess.Popen([sys.executable, "-m", "hi3d.cli", "reconstruct", str(tiny_orbit), "--out", str(out),
                             "--num-interp", "0", "--no-progress"] + args, env=env)
    try:
        while not (out / "neus.pt").is_file() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        rc = proc.wait()
    step = torch.load(out / "neus.pt", weights_only=False)["step"]
    assert rc == -signal.SIGKILL and 0 < step < 24 and not (out / "mesh.ply").exists(), (rc, step)
    reconstruct(tiny_orbit, out, 0, tiny_cfg(*args[len(TINY):]), progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["stages"]["neus"]["resumed_from_step"] == step
    a, b = _neus_weights(tmp_path / "full" / "neus.pt"), _neus_weights(out / "neus.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "mesh.ply").read_bytes() == (out / "mesh.ply").read_bytes()
