"""hi3d generate end to end with tiny random components (the weights folder is built here)."""

import json
import shutil

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from hi3d import cameras as C
from hi3d.cli import main
from hi3d.data.orbit import load_orbit
from hi3d.errors import Hi3DError
from hi3d.io import load_png, save_png
from hi3d.pipelines.weights import check_weights
from hi3d.testing import save_tiny_weights

FAST_RECON = ["recon.gaussians.iterations=20", "recon.gaussians.num_points=500", "recon.gaussians.train_resolution=64",
              "recon.gaussians.hull_resolution=24", "recon.neus.iterations=20", "recon.neus.batch_rays=128",
              "recon.neus.num_samples=16", "recon.neus.num_importance=16", "recon.neus.eikonal_points=256",
              "recon.mesh.resolution=32", "recon.turntable_views=4", "recon.turntable_resolution=32"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def spider_image(tmp_path_factory):
    from conftest import real_object

    from hi3d.data.render import render_views

    path = real_object("spider")
    view = render_views(path, C.orbit_c2w(torch.tensor([30.0]), torch.tensor([20.0])), C.intrinsics(96), 96, 96)
    out = tmp_path_factory.mktemp("input") / "spider.png"
    save_png(out, view.rgba[0])
    return out


def _generate(*args):
    return main(["generate", *[str(a) for a in args]])


def test_generate_writes_every_output_and_resumes(tmp_path, weights, spider_image):
    out = tmp_path / "out"
    assert _generate(spider_image, "--out", out, "--weights", weights, "--num-interp", 4, "--elevation", 20,
                     "device=cpu", *FAST_RECON) == 0
    for rel in ["input.png", "stage1/cameras.json", "stage2/cameras.json", "depth/000.png", "contact_sheet.png",
                "recon/interp/cameras.json", "recon/mesh.glb", "recon/mesh.obj", "recon/mesh.ply",
                "recon/turntable.png", "run.json", "status.json"]:
        assert (out / rel).is_file(), rel
    # input.png: the image stage 1 sees (its resolution), the mask used beside it
    assert load_png(out / "input.png").shape == (32, 32, 3) and load_png(out / "input_mask.png").shape == (32, 32, 1)
    s1, s2 = load_orbit(out / "stage1"), load_orbit(out / "stage2")
    assert len(s1) == len(s2) == 4 and s1.width == 32 and s2.width == 64
    torch.testing.assert_close(s2.K[0, :2], s1.K[0, :2] * 2)  # same cameras at twice the resolution
    torch.testing.assert_close(s1.elevation_deg, torch.full((4,), 20.0, dtype=torch.float64))
    assert len(load_orbit(out / "recon/interp")) == 4
    mesh = trimesh.load(out / "recon/mesh.glb", force="mesh")
    assert len(mesh.faces) > 0 and np.isfinite(mesh.vertices).all()
    run = json.loads((out / "run.json").read_text())
    assert {"stage1/seed_0", "stage2/seed_0", "reconstruct/seed_0"} <= set(run["stages"])
    assert all(v["wall_time_s"] >= 0 and v["cpu_max_rss_mb"] > 0 for v in run["stages"].values())
    assert any(k.startswith("stage1/") for k in run["weights"][str(weights)])
    # one device for every stage, recorded per stage: the diffusion stages, 3DGS and NeuS (and the mesh)
    assert {k: v["device"] for k, v in run["devices"].items()} == dict.fromkeys(
        ["stage1", "stage2", "interpolate", "neus", "mesh"], "cpu")
    assert {run["stages"][f"{k}/seed_0"]["device"] for k in ("stage1", "stage2", "reconstruct")} == {"cpu"}
    assert run["stages"]["reconstruct/seed_0"]["stages"] == {"interpolate": "cpu", "neus": "cpu", "mesh": "cpu"}
    recon_run = json.loads((out / "recon/run.json").read_text())
    assert {k: recon_run["stages"][k]["device"] for k in ("interpolate", "neus", "mesh")} == dict.fromkeys(
        ["interpolate", "neus", "mesh"], "cpu")
    assert recon_run["config"]["gaussians"]["device"] == recon_run["config"]["neus"]["device"] == "cpu"

    # a run killed after stage 2 and after interpolation resumes without redoing finished stages
    stage1_time = (out / "stage1/cameras.json").stat().st_mtime_ns
    for name in ("mesh.glb", "mesh.obj", "mesh.ply", "neus.pt", "turntable.png"):
        (out / "recon" / name).unlink()
    assert _generate(spider_image, "--out", out, "--weights", weights, "--num-interp", 4, *FAST_RECON) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["stages"]["stage1/seed_0"]["skipped"] and run["stages"]["stage2/seed_0"]["skipped"]
    recon = json.loads((out / "recon/run.json").read_text())
    assert recon["stages"]["interpolate"]["skipped"] and not recon["stages"]["neus"]["skipped"]
    assert (out / "stage1/cameras.json").stat().st_mtime_ns == stage1_time
    assert (out / "recon/mesh.glb").is_file()


def test_same_seed_same_stage_outputs(tmp_path, weights, spider_image):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _generate(spider_image, "--out", a, "--weights", weights, "--seed", 3, "--num-seeds", 2,
                     "--stages", "stage2") == 0
    assert _generate(spider_image, "--out", b, "--weights", weights, "--seed", 3, "--stages", "stage2") == 0
    frames = lambda d: [(d / st / "rgba" / f"{i:03d}.png").read_bytes() for st in ("stage1", "stage2")  # noqa: E731
                        for i in range(4)]
    assert frames(a / "seed_3") == frames(b)
    assert frames(a / "seed_3")[1:4] != frames(a / "seed_4")[1:4]  # frame 0 is the input either way
    assert not (b / "recon").exists()


@pytest.mark.parametrize("stages", ["stage1", pytest.param("mesh", marks=pytest.mark.slow)])
def test_text_to_3d(tmp_path, weights, stages):
    from hi3d.testing import save_tiny_u2net

    out = tmp_path / "text"
    # the tiny text-to-image model paints noise, not a plain background: it is cut out by a (tiny) model
    model = tmp_path / "u2net.onnx"
    save_tiny_u2net(model)
    assert _generate("--text", "a red chair", "--out", out, "--weights", weights, "--num-interp", 4, "--stages",
                     stages, "inputs.min_object_fraction=0", f"inputs.background_removal={model}", "text.resolution=32",
                     "text.num_inference_steps=2", *FAST_RECON) == 0
    assert (out / "text_image.png").is_file() and (out / "stage1/cameras.json").is_file()
    assert (out / "recon/mesh.glb").is_file() == (stages == "mesh")
    assert json.loads((out / "run.json").read_text())["prompt"] == "a red chair"


def test_batch_summary_and_failures_not_fatal(tmp_path, weights, spider_image, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(spider_image, folder / "good.png")
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(folder / "blank.png")
    out = tmp_path / "batch"
    assert _generate(folder, "--out", out, "--weights", weights, "--stages", "stage1") == 1
    summary = (out / "summary.md").read_text()
    assert "1/2 succeeded" in summary and "no object found" in summary
    good_time = (out / "good/stage1/cameras.json").stat().st_mtime_ns
    _generate(folder, "--out", out, "--weights", weights, "--stages", "stage1")
    assert (out / "good/stage1/cameras.json").stat().st_mtime_ns == good_time  # finished inputs skipped


def test_batch_is_sharded_across_two_accelerate_processes(tmp_path, weights, spider_image):
    """``accelerate launch --num_processes 2 -m hi3d.cli generate FOLDER``: each input made once, by one of
    the two processes; the summary covers all of them, failures included."""
    from conftest import accelerate_launch_two_cpu

    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(spider_image, folder / f"{name}.png")
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(folder / "blank.png")
    out = tmp_path / "batch"
    proc = accelerate_launch_two_cpu(["-m", "hi3d.cli", "generate", str(folder), "--out", str(out), "--weights",
                                      str(weights), "--stages", "stage1"], timeout=600, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one input failed: the batch says so in its exit code
    status = {n: json.loads((out / n / "status.json").read_text()) for n in ("a", "b", "blank", "c")}
    assert {n: s["status"] for n, s in status.items()} == {"a": "ok", "b": "ok", "blank": "failed", "c": "ok"}
    # sorted a, b, blank, c, dealt round-robin
    assert {n: s["process"] for n, s in status.items()} == {"a": 0, "b": 1, "blank": 0, "c": 1}
    assert "3/4 succeeded" in (out / "summary.md").read_text()


def test_bad_inputs_give_one_line_errors(tmp_path, weights, spider_image, capsys):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((40, 40, 4), np.uint8)).save(blank)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cases = [
        ([blank, "--weights", weights], "no object found"),
        ([empty, "--weights", weights], "cannot read image"),
        ([spider_image, "--weights", tmp_path / "nowhere"], "no stage1/"),
        ([spider_image], "no weights folder"),
        ([spider_image, "--weights", weights, "stage_2=model"], "unknown config key 'stage_2'"),
    ]
    for args, message in cases:
        assert _generate(*args, "--out", tmp_path / "o", "--stages", "stage1") == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("override", ["device=cuda", "recon.neus.device=cuda", "recon.gaussians.device=cuda:1"])
def test_cuda_without_cuda_fails_at_start_up(tmp_path, weights, spider_image, capsys, override):
    """``device=cuda`` (or one stage's) on a CPU-only machine: one line, before anything is written."""
    out = tmp_path / "o"
    assert _generate(spider_image, "--out", out, "--weights", weights, override) == 2
    err = capsys.readouterr().err.strip()
    assert "CUDA is not available" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_stage_devices_inherit_the_command_device_unless_overridden():
    from hi3d.recon.neus import NeuSConfig
    from hi3d.recon.reconstruct import ReconstructConfig, resolve_devices, stage_devices

    # "meta" stands for an accelerator this CPU-only machine can name: the command's device reaches each stage
    assert stage_devices(resolve_devices(ReconstructConfig(), "meta")) == dict.fromkeys(["interpolate", "neus", "mesh"], "meta")
    cfg = resolve_devices(ReconstructConfig(neus=NeuSConfig(device="cpu")), "meta")  # a per-stage override wins
    assert stage_devices(cfg) == {"interpolate": "meta", "neus": "cpu", "mesh": "cpu"}
    assert stage_devices(resolve_devices(ReconstructConfig(device="cpu"), "meta"))["interpolate"] == "cpu"
    assert stage_devices(resolve_devices(ReconstructConfig()))["neus"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_incompatible_checkpoint_shapes(tmp_path, weights, spider_image, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(weights, bad)
    shutil.rmtree(bad / "stage1" / "unet")
    shutil.copytree(weights / "stage2" / "unet", bad / "stage1" / "unet")  # a stage-2 UNet where stage 1's belongs
    assert _generate(spider_image, "--out", tmp_path / "o", "--weights", bad, "--stages", "stage1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "UNet" in err and ("512 features" in err or "incompatible checkpoint shapes" in err), err
    report = check_weights(bad)
    assert not report.ok and report.components["stage1"] != "ok" and report.components["stage2"] == "ok"


def test_check_weights(tmp_path, weights, capsys):
    assert main(["check-weights", str(weights)]) == 0
    assert json.loads(capsys.readouterr().out)["components"]["stage2"] == "ok"
    partial = tmp_path / "partial"
    shutil.copytree(weights / "stage1", partial / "stage1")
    cfg = json.loads((partial / "stage1/unet/config.json").read_text())
    cfg["block_out_channels"] = [c * 2 for c in cfg["block_out_channels"]]
    (partial / "stage1/unet/config.json").write_text(json.dumps(cfg))
    report = check_weights(partial)
    assert not report.ok and "missing" in report.components["stage2"]
    assert report.components["stage1"] != "ok"
    assert main(["check-weights", str(partial)]) == 2
    with pytest.raises(Hi3DError, match="weights folder not found"):
        check_weights(tmp_path / "nope")


@pytest.mark.gpu
@pytest.mark.weights
def test_real_weights_benchmark_on_gpu(tmp_path):
    """With HI3D_WEIGHTS=<a weights folder, README layout> on CUDA: scripts/benchmarks/generate.py records every
    stage's time and CUDA peak memory."""
    import os
    import runpy
    from pathlib import Path

    folder = os.environ.get("HI3D_WEIGHTS")
    if not folder or not os.path.isdir(folder):
        pytest.skip("set HI3D_WEIGHTS to a weights folder (README: Weights layout)")
    bench = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "benchmarks" / "generate.py"))
    result = bench["main"](["--weights", folder, "--device", "cuda", "--out", str(tmp_path)])
    stages = result["stages"]
    assert {"stage1", "stage2", "reconstruct"} <= set(stages), stages
    assert all(v["wall_time_s"] > 0 for v in stages.values())
    assert stages["stage1"]["cuda_peak_mb"] > 0 and stages["stage2"]["cuda_peak_mb"] > 0
    assert (tmp_path / "generate.md").is_file()
