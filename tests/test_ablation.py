import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import real_object

from hi3d.config import load_config
from hi3d.data.mesh_io import as_trimesh, load_mesh, to_file_coords
from hi3d.data.orbit import load_orbit
from hi3d.errors import Hi3DError
from hi3d.eval import ablation

REPO = Path(__file__).resolve().parent.parent
SMALL = ["num_views=4", "resolution=48", "num_points=3000", "iou_resolution=32"]


def shrinking_error_reconstructor(calls):
    """Test double for the reconstructor: the source mesh (via the orbit's recorded normalisation) shifted
    by 0.1 / (1 + M / 8) and exported in source coordinates, as 'hi3d reconstruct' exports; fails for M = 99."""

    def fn(views_dir, out_dir, m, overrides, seed=0):
        calls.append((Path(out_dir).parents[2].name, m, tuple(overrides), seed))
        if m == 99:
            raise RuntimeError("reconstruction diverged")
        orbit = load_orbit(views_dir, load_depth=False)
        scene, norm = load_mesh(orbit.meta["mesh"])
        assert np.allclose(norm, orbit.normalization.numpy())
        mesh = as_trimesh(scene)
        mesh.apply_translation([0.1 / (1 + m / 8) + 0.01 * seed, 0, 0])
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        to_file_coords(mesh, norm).export(Path(out_dir) / "mesh.ply")
        return Path(out_dir) / "mesh.ply"

    return fn


def test_ablation_table_plot_resume_and_failures(tmp_path):
    objects = [str(real_object("wuson")), str(real_object("spider"))]
    cfg = load_config(ablation.AblationConfig, None, [f"objects=[{','.join(objects)}]", f"out={tmp_path}",
                                                      "m_values=[0,8,99,32]", "reconstruct_overrides=[a=1]"] + SMALL)
    calls = []
    res = ablation.run_ablation(cfg, shrinking_error_reconstructor(calls))
    assert [(f["object"], f["m"]) for f in res["failed"]] == [("Wuson", 99), ("spider", 99)]
    assert calls[0] == ("Wuson", 0, ("a=1",), 0)
    means = {r["m"]: r for r in res["summary"]}
    assert sorted(means) == [0, 8, 32] and all(r["objects"] == 2 and r["seeds"] == 1 for r in means.values())
    assert means[0]["chamfer"] > means[8]["chamfer"] > means[32]["chamfer"]
    assert means[0]["iou"] < means[8]["iou"] < means[32]["iou"]
    assert means[0]["chamfer_std"] is None and means[0]["views_psnr"] is None  # one seed; GT views
    csv = (tmp_path / "ablation.csv").read_text().splitlines()
    assert csv[0].startswith("source,object,stage2,m,seed,chamfer,iou,f_score,interp_psnr")
    assert csv[-1].startswith("failed,spider,,99,0") and any(c.startswith("ours-mean,mean,,32,n=1") for c in csv)
    assert "published-table4,GSO,full,16,,0.0172,0.6631" in "\n".join(csv)
    md = (tmp_path / "ablation.md").read_text()
    assert "| GT views | 0 | 2 | 1 |" in md and "| 16 | 0.0172 | 0.6631 |" in md and "not measured here" in md
    assert "| no_depth | 23.12 | 0.848 | 0.128 |" in md
    png = tmp_path / "ablation.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "Wuson" / "gt" / "s0" / "M99" / "error.txt").is_file()
    # re-run: finished cells are skipped, only the failed ones retried, same numbers
    calls.clear()
    again = ablation.run_ablation(cfg, shrinking_error_reconstructor(calls))
    assert sorted(c[1] for c in calls) == [99, 99]
    assert again["summary"] == res["summary"]
    assert json.loads((tmp_path / "ablation.json").read_text())["summary"] == res["summary"]
    # a changed reconstruction setting redoes the finished cells
    calls.clear()
    cfg.reconstruct_overrides = ["a=2"]
    ablation.run_ablation(cfg, shrinking_error_reconstructor(calls))
    assert len(calls) == 8


def test_seeds_give_mean_and_spread_per_cell(tmp_path):
    import statistics

    wuson = str(real_object("wuson"))
    cfg = load_config(ablation.AblationConfig, None, [f"objects=[{wuson}]", f"out={tmp_path}", "m_values=[0,16]",
                                                      "seeds=[0,1,2]"] + SMALL)
    calls = []
    res = ablation.run_ablation(cfg, shrinking_error_reconstructor(calls))
    assert sorted(c[3] for c in calls) == [0, 0, 1, 1, 2, 2] and not res["failed"]
    for m in (0, 16):
        rows = [r for r in res["rows"] if r["m"] == m]
        s = next(s for s in res["summary"] if s["m"] == m)
        assert s["seeds"] == 3 and s["chamfer"] == pytest.approx(statistics.mean(r["chamfer"] for r in rows))
        assert s["chamfer_std"] == pytest.approx(statistics.stdev(r["chamfer"] for r in rows))
        assert s["chamfer_std"] > 0.001  # the double shifts each seed by 0.01
    assert "± " in (tmp_path / "ablation.md").read_text()


def test_ablation_config_errors(tmp_path):
    wuson = str(real_object("wuson"))
    base = [f"objects=[{wuson}]", f"out={tmp_path}"] + SMALL
    run = lambda *o: ablation.run_ablation(load_config(ablation.AblationConfig, None, base + list(o)))  # noqa: E731
    with pytest.raises(Hi3DError, match="stage2"):
        run("stage2=[upscale]")
    with pytest.raises(Hi3DError, match="neither a mesh file"):
        ablation.run_ablation(load_config(ablation.AblationConfig, None, [f"out={tmp_path}", "objects=[nothing]"]))
    cfg = load_config(ablation.AblationConfig, None, [])
    assert ablation.object_source("wuson", cfg) == ("wuson", real_object("wuson"))  # a real object by name
    with pytest.raises(Hi3DError, match="reconstructor 'nope' unknown"):
        run("reconstructor=nope")
    with pytest.raises(Hi3DError, match="views=generated needs generator="):
        run("views=generated")
    with pytest.raises(Hi3DError, match="generator=perturbed has no stage 2"):
        run("views=generated", "generator=perturbed", "stage2=[none]")
    with pytest.raises(Hi3DError, match="perturb.shape"):
        run("views=generated", "generator=perturbed", "perturb.shape=-1")
    with pytest.raises(Hi3DError, match="seeds"):
        run("seeds=[1,1]")
    assert not (tmp_path / "ablation.json").exists()  # all of these fail before anything runs


def test_perturbed_generated_views_are_scored_against_the_ground_truth(tmp_path):
    wuson = str(real_object("wuson"))
    cfg = load_config(ablation.AblationConfig, None, [f"objects=[{wuson}]", f"out={tmp_path}", "m_values=[0]",
                                                      "views=generated", "generator=perturbed", "seeds=[0,1]"] + SMALL)
    calls = []
    res = ablation.run_ablation(cfg, shrinking_error_reconstructor(calls))
    assert not res["failed"] and [r["stage2"] for r in res["rows"]] == ["full", "full"]
    views = tmp_path / "Wuson" / "perturbed-full" / "s1" / "views"
    assert json.loads((views / "perturbation.json").read_text())["seed"] == 1
    r = res["rows"][0]
    assert 15 < r["views_psnr"] < 60 and 0.5 < r["views_ssim"] < 1 and r["interp_psnr"] is None
    # views are made once per (object, seed) and made again when the perturbation changes
    stamp = (views / "cameras.json").stat().st_mtime_ns
    cfg.m_values = [0, 4]
    ablation.run_ablation(cfg, shrinking_error_reconstructor(calls))
    assert (views / "cameras.json").stat().st_mtime_ns == stamp
    cfg.perturb.strength = 0.5
    again = ablation.run_ablation(cfg, shrinking_error_reconstructor(calls))
    assert (views / "cameras.json").stat().st_mtime_ns != stamp
    assert again["rows"][0]["views_psnr"] > r["views_psnr"] + 1  # the cells are redone: weaker perturbation


def test_upscale_views_bicubic():
    from hi3d import cameras
    from hi3d.data.orbit import Orbit

    c2w, az, el = cameras.orbit_poses(2, 20.0)
    ramp = 0.25 + 0.5 * (torch.arange(8) + 0.5) / 8  # linear in x: bicubic reproduces it inside the image
    rgba = ramp.view(1, 1, 8, 1).expand(2, 8, 8, 4).contiguous()
    o = Orbit(rgba=rgba, c2w=c2w, K=cameras.intrinsics(8, 8).expand(2, 3, 3),
              azimuth_deg=az, elevation_deg=el, radius=torch.full((2,), 1.5, dtype=torch.float64))
    up = ablation.upscale_views(o, 32)
    assert up.rgba.shape == (2, 32, 32, 4) and up.rgba.min() >= 0 and up.rgba.max() <= 1
    assert torch.allclose(up.K[0], cameras.intrinsics(32, 32))
    src_x = (torch.arange(32) + 0.5) / 4 - 0.5  # source pixel coordinate of each new pixel centre
    expect = 0.25 + 0.5 * (src_x + 0.5) / 8
    assert torch.allclose(up.rgba[0, 5, 8:24, 0], expect[8:24], atol=1e-5)


def test_ablate_m_script_errors(capsys):
    main = runpy.run_path(str(REPO / "scripts" / "ablate_m.py"))["main"]
    assert main(["--views", "gt"]) == 2
    assert "no objects given" in capsys.readouterr().err


@pytest.mark.slow
def test_ablate_m_real_reconstruction(tmp_path):
    """The acceptance run: 'hi3d reconstruct' on the GT orbits (256²) of 3 real objects for M = 0, 16 with a
    short CPU schedule (about 5-10 min per reconstruction on 2 cores)."""
    pytest.importorskip("hi3d.recon.reconstruct")
    objects = ",".join(str(real_object(n)) for n in ("bunny", "spider", "wuson"))
    main = runpy.run_path(str(REPO / "scripts" / "ablate_m.py"))["main"]
    short = ["--config", str(REPO / "configs" / "recon" / "neus.yaml"), "--no-progress", "gaussians.iterations=60",
             "gaussians.densify_stop=50", "neus.iterations=60", "mesh.resolution=128"]
    assert main(["--objects", objects, "--views", "gt", "--m", "0,16", "--out", str(tmp_path),
                 f"reconstruct_overrides=[{','.join(short)}]"]) == 0
    res = json.loads((tmp_path / "ablation.json").read_text())
    assert not res["failed"] and len(res["rows"]) == 6 and (tmp_path / "ablation.png").is_file()


def test_hi3d_reconstructor_failure_is_reported(tmp_path):
    """The default reconstructor runs 'hi3d reconstruct' in a child process; a failing run is one clear error."""
    with pytest.raises(Hi3DError, match="reconstruct.log"):
        ablation.reconstruct_with_hi3d(tmp_path / "no_views", tmp_path / "M0", 0, [])
    assert (tmp_path / "M0" / "reconstruct.log").stat().st_size > 0


def test_visual_hull_carving_sphere_and_real_object(tmp_path):
    """Carving from 6 silhouettes of a sphere contains the sphere and is close to it; on a real object more
    (oracle-rendered) views never enlarge the hull and the reconstruction scores well."""
    import trimesh

    from hi3d import cameras
    from hi3d.data.render import render_views

    sphere = trimesh.creation.icosphere(3, radius=0.3)
    c2w, _, _ = cameras.orbit_poses(6, 20.0)
    orbit = render_views(sphere, c2w, cameras.intrinsics(48, 48), 48, 48)
    occ = ablation.carve_visual_hull(orbit, resolution=32, bound=0.55)
    axis = torch.linspace(-0.55, 0.55, 32, dtype=torch.float64)
    r = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).norm(dim=-1)
    assert occ[r < 0.27].min() == 1 and occ[r > 0.45].max() == 0
    cfg = load_config(ablation.AblationConfig, None, [f"objects=[{real_object('wuson')}]", f"out={tmp_path}",
                                                      "num_views=4", "resolution=48", "m_values=[0,4]",
                                                      "reconstructor=visual-hull", "reconstruct_overrides=[resolution=48]",
                                                      "num_points=3000", "iou_resolution=32"])
    res = ablation.run_ablation(cfg)
    assert not res["failed"]
    m0, m4 = res["rows"]
    assert m0["iou"] > 0.5 and m4["iou"] >= m0["iou"] - 0.01


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from diffusers import UNetSpatioTemporalConditionModel

    from hi3d.testing import save_tiny_weights

    folder = save_tiny_weights(tmp_path_factory.mktemp("weights"), text_to_image=False)
    # the new conv_in columns (depth, frame latents) start at zero, as in training; random ones make the depth
    # channels count, so zeroing them (no_depth) shows in the output
    unet = UNetSpatioTemporalConditionModel.from_pretrained(folder / "stage2" / "unet")
    with torch.no_grad():
        w = unet.conv_in.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    unet.save_pretrained(folder / "stage2" / "unet")
    return folder


def test_hi3d_generator_runs_each_stage2_mode_from_a_weights_folder(tmp_path, tiny_weights):
    """generator=hi3d is `hi3d generate` (stage 1 -> stage 2) on tiny random weights saved as a weights folder."""
    import trimesh

    from hi3d.models.rrdbnet import RRDBNet
    from hi3d.pipelines.image_to_3d import STAGE2_MODES, GenerateConfig, ImageTo3D
    from hi3d.pipelines.refine import upsample

    g = torch.Generator().manual_seed(0)
    esr = tmp_path / "esr.pth"
    tiny = RRDBNet(num_feat=8, num_block=1, num_grow_ch=8).state_dict()
    torch.save({"params_ema": {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in tiny.items()}}, esr)

    def sphere(views_dir, out_dir, m, overrides, seed=0):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        trimesh.creation.icosphere(2, radius=0.4).export(Path(out_dir) / "mesh.ply")
        return Path(out_dir) / "mesh.ply"

    cfg = load_config(ablation.AblationConfig, None, [
        f"objects=[{real_object('wuson')}]", f"out={tmp_path / 'out'}", "m_values=[0]", "views=generated",
        "generator=hi3d", f"weights={tiny_weights}", f"stage2=[{','.join(STAGE2_MODES)}]",
        f"generate_overrides=[realesrgan_weights={esr},device=cpu]"] + SMALL)
    res = ablation.run_ablation(cfg, sphere)
    assert not res["failed"] and [r["stage2"] for r in res["rows"]] == list(STAGE2_MODES)
    assert all(r["views_psnr"] is not None for r in res["rows"])
    gen = {m: tmp_path / "out" / "Wuson" / f"hi3d-{m}" / "s0" / "generate" for m in STAGE2_MODES}
    s2 = {m: load_orbit(gen[m] / "stage2", load_depth=False) for m in STAGE2_MODES}
    s1 = load_orbit(gen["full"] / "stage1", load_depth=False)
    assert {m: o.width for m, o in s2.items()} == {"full": 64, "none": 32, "no_depth": 64, "bicubic": 64, "realesrgan": 64}
    assert json.loads((gen["no_depth"] / "run.json").read_text())["stages"]["stage2/seed_0"]["mode"] == "no_depth"
    assert (gen["full"] / "depth" / "000.png").is_file() and not (gen["no_depth"] / "depth").exists()
    assert (s2["full"].rgba[1:, ..., :3] - s2["no_depth"].rgba[1:, ..., :3]).abs().max() > 1e-3  # zero depth changes it
    assert torch.allclose(s2["none"].rgba, s1.rgba)  # no stage 2: the stage-1 frames
    ref = upsample(s1.rgb_on_white().permute(0, 3, 1, 2)[None], 64, "bicubic")[0].permute(0, 2, 3, 1)
    assert (s2["bicubic"].rgba[..., :3] - ref).abs().max() < 1.5 / 255
    assert (s2["realesrgan"].rgba[..., :3] - ref).abs().mean() > 0.01  # the RRDBNet's output, not bicubic's
    with pytest.raises(Hi3DError, match="stage2='model' is not one of full, none, no_depth, bicubic, realesrgan"):
        ImageTo3D(GenerateConfig(stage2="model"))


def test_realesrgan_without_its_file_fails_at_start_up_in_one_line(tmp_path, tiny_weights, capsys):
    main = runpy.run_path(str(REPO / "scripts" / "ablate_m.py"))["main"]
    assert main(["--objects", str(real_object("wuson")), "--views", "generated", "generator=hi3d",
                 f"weights={tiny_weights}", "--stage2", "full,realesrgan", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "RealESRGAN_x4plus.pth at " + str(tiny_weights / "realesrgan") in err
    assert not any(tmp_path.iterdir())
    assert main(["--objects", str(real_object("wuson")), "--views", "generated", "generator=hi3d",
                 "--out", str(tmp_path)]) == 2
    assert "needs weights=DIR" in capsys.readouterr().err


def test_failed_views_are_listed_once_and_retried(tmp_path, monkeypatch):
    """Views that fail (one seed of the generator) are recorded (views.failed.json), listed once with m None
    and their cells not run; the next run makes them and runs those cells only."""
    wuson = str(real_object("wuson"))
    cfg = load_config(ablation.AblationConfig, None, [f"objects=[{wuson}]", f"out={tmp_path}", "m_values=[0,4]",
                                                      "views=generated", "generator=perturbed", "seeds=[0,1]"] + SMALL)
    real = ablation.GENERATORS["perturbed"]

    class Flaky(type(real)):
        def __call__(self, cfg, gt_dir, out_dir, stage2, seed):
            if seed == 1:
                raise RuntimeError("generator out of memory")
            return real(cfg, gt_dir, out_dir, stage2, seed)

    monkeypatch.setitem(ablation.GENERATORS, "perturbed", Flaky())
    calls = []
    res = ablation.run_ablation(cfg, shrinking_error_reconstructor(calls))
    assert [(f["seed"], f["m"], f["error"]) for f in res["failed"]] == [(1, None, "RuntimeError: generator out of memory")]
    assert [(r["seed"], r["m"]) for r in res["rows"]] == [(0, 0), (0, 4)] and len(calls) == 2
    assert json.loads((tmp_path / "Wuson" / "perturbed-full" / "s1" / "views.failed.json").read_text())["process"] == 0
    monkeypatch.setitem(ablation.GENERATORS, "perturbed", real)
    calls.clear()
    again = ablation.run_ablation(cfg, shrinking_error_reconstructor(calls))
    assert not again["failed"] and sorted(c[1:] for c in calls) == [(0, (), 1), (4, (), 1)]
    assert not (tmp_path / "Wuson" / "perturbed-full" / "s1" / "views.failed.json").exists()
