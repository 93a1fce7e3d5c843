import copy
import dataclasses

import pytest
import torch

from hi3d.errors import Hi3DError
from hi3d.models import stage1
from hi3d.models.conditioning import SVD_SLOTS, added_time_ids
from hi3d.models.depth import DepthConfig, tiny_depth_estimator
from hi3d.models.stage1 import TinyConfig
from hi3d.models.stage2 import (
    Stage2Config,
    frame_conditions,
    in_channels,
    load_stage2,
    tiny_components,
    widen_for_stage2,
)
from hi3d.models.svd import unet_forward
from hi3d.pipelines.refine import RefinePipeline, upsample
from hi3d.training.stage2 import Stage2Task


def tiny_cfg(**kw) -> Stage2Config:
    kw = {"num_frames": 3, "resolution": 32, "num_inference_steps": 3, "tiny": TinyConfig(enabled=True),
          "depth": DepthConfig(input_size=32), **kw}
    cfg = Stage2Config(**kw)
    cfg.degradation.degrade_size = 32
    return cfg


@pytest.fixture(scope="module")
def comps():
    return tiny_components(tiny_cfg())


def batch(B=2, F=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"frames": torch.rand(B, F, 3, size, size, generator=g) * 2 - 1, "elevation": torch.tensor([10.0, -5.0])[:B]}


def test_widened_unet_equals_original_at_init():
    """'Original' = SVD's 8-channel UNet given [noisy, frame latent]; the widened 17-channel UNet gets
    [noisy, depth (anything), frame latent] and must return the same: < 1e-6 in float64 (float32 differs
    by ~1e-6 relative only through the convolution's summation order over 17 vs 8 channels)."""
    cfg = tiny_cfg()
    original = stage1.tiny_components(stage1.Stage1Config(num_frames=3, slots=list(cfg.slots), tiny=cfg.tiny)).unet
    original = original.double()
    widened = copy.deepcopy(original)
    widen_for_stage2(widened, cfg)
    assert original.config.in_channels == 8 and widened.config.in_channels == in_channels(cfg) == 17
    assert widened.conv_in.weight[:, 4:13].abs().max() == 0
    g = torch.Generator().manual_seed(1)
    f64 = dict(generator=g, dtype=torch.float64)
    x, lat = torch.randn(2, 3, 4, 8, 8, **f64), torch.randn(2, 3, 4, 8, 8, **f64)
    depth = torch.rand(2, 3, 9, 8, 8, **f64) * 2 - 1
    clip = torch.randn(2, 1, original.config.cross_attention_dim, **f64)
    ids = added_time_ids(cfg.slots, torch.tensor([10.0, 30.0]), torch.tensor(0.02)).double()
    c = torch.tensor([0.3, -0.2])
    ref = unet_forward(original, x, c, lat, clip, ids)
    out = unet_forward(widened, x, c, torch.cat([depth, lat], 2), clip, ids)
    assert (out - ref).abs().max() < 1e-6
    # the 1-channel "resize" packing widens to 9 channels the same way
    cfg1 = tiny_cfg(depth=DepthConfig(input_size=32, packing="resize"))
    w1 = copy.deepcopy(original)
    widen_for_stage2(w1, cfg1)
    assert w1.config.in_channels == 9
    assert (unet_forward(w1, x, c, torch.cat([depth[:, :, :1], lat], 2), clip, ids) - ref).abs().max() < 1e-6
    # float32: equal up to summation order
    out32 = unet_forward(widened.float(), x.float(), c, torch.cat([depth, lat], 2).float(), clip.float(), ids.float())
    assert (out32 - ref).abs().max() < 1e-5


def test_conditions_layout_and_depth_ablation(comps):
    cfg = tiny_cfg()
    frames01 = (batch()["frames"] + 1) / 2
    aug = torch.tensor([0.0, 0.0])
    cat = frame_conditions(comps, cfg, frames01, aug, torch.Generator().manual_seed(0))
    assert cat.shape == (2, 3, 13, 8, 8)
    depth = cat[:, :, :9]
    assert depth.abs().max() > 0.5 and depth.min() >= -1 and depth.max() <= 1
    # per-frame latents (not frame 0 repeated): the unscaled posterior mode of each frame
    lat = comps.vae.encode(frames01[1, 2:3] * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(cat[1, 2, 9:], lat[0], atol=1e-5, rtol=1e-4)
    no_depth = frame_conditions(comps, dataclasses.replace(cfg, use_depth=False), frames01, aug, None)
    assert no_depth[:, :, :9].abs().max() == 0
    torch.testing.assert_close(no_depth[:, :, 9:], cat[:, :, 9:])


def test_training_drops_latents_and_clip_but_not_depth(comps):
    """As train-v02.yaml: the CLIP and frame-latent embedders have ucg_rate 0.1, the DepthEmbedder 0.0."""
    b = batch()
    b["degraded"] = b["frames"]
    full = Stage2Task(tiny_cfg(cond_dropout=0.0), comps).conditions(b, torch.Generator().manual_seed(0))[1]
    cat = Stage2Task(tiny_cfg(cond_dropout=1.0), comps).conditions(b, torch.Generator().manual_seed(0))[1]
    assert Stage2Config().depth_dropout == 0.0 and full[:, :, :9].abs().max() > 0.5
    torch.testing.assert_close(cat[:, :, :9], full[:, :, :9])
    assert cat[:, :, 9:].abs().max() == 0
    none = Stage2Task(tiny_cfg(cond_dropout=1.0, depth_dropout=1.0), comps).conditions(b, torch.Generator().manual_seed(0))
    assert none[1].abs().max() == 0 and none[2].abs().max() == 0


def test_training_loss_seeded_and_reaches_depth_weights(comps):
    task = Stage2Task(tiny_cfg(), copy.deepcopy(comps))
    assert task.unet.add_embedding.linear_1.in_features == 512
    assert [type(m).__name__ for m in task.frozen_modules()] == [
        "AutoencoderKLTemporalDecoder", "CLIPVisionModelWithProjection", "DepthEstimator"]
    b = batch()
    l1 = task.training_loss(task.unet, b, torch.Generator().manual_seed(0))
    l2 = task.training_loss(task.unet, b, torch.Generator().manual_seed(0))
    l3 = task.training_loss(task.unet, b, torch.Generator().manual_seed(1))
    assert torch.equal(l1, l2) and not torch.equal(l1, l3) and torch.isfinite(l1)
    l1.backward()
    grad = task.unet.conv_in.weight.grad
    assert grad[:, 4:13].abs().max() > 0  # zero-initialised depth columns learn
    # Ĵ: frame 0 clean, the others degraded
    deg = task.degrade(b, torch.Generator().manual_seed(0))
    torch.testing.assert_close(deg[:, 0], (b["frames"][:, 0] + 1) / 2)
    assert not torch.allclose(deg[:, 1:], (b["frames"][:, 1:] + 1) / 2, atol=0.02)


def test_refine_pipeline_shapes_seeds_low_memory_and_roundtrip(comps, tmp_path):
    cfg = tiny_cfg()
    pipe = RefinePipeline.from_components(comps, cfg)
    frames = (batch(size=16)["frames"] + 1) / 2  # "stage-1" output at 16² -> refined at 32² (2x)
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    out = pipe.refine(frames, torch.tensor([10.0, 20.0]), image=image, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out[:, 0], upsample(image[:, None], 32)[:, 0])  # frame 0 = input image
    again = pipe.refine(frames, torch.tensor([10.0, 20.0]), image=image, generator=torch.Generator().manual_seed(0))
    other = pipe.refine(frames, torch.tensor([10.0, 20.0]), image=image, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    # low_memory: chunked VAE + sequential guidance passes (offload is a no-op on CPU) = same result at the
    # same decode chunk (the temporal decoder mixes the frames of a chunk)
    low = RefinePipeline.from_components(comps, dataclasses.replace(cfg, low_memory=True, decode_chunk_size=2))
    ref = RefinePipeline.from_components(comps, dataclasses.replace(cfg, decode_chunk_size=2))
    args = (frames, torch.tensor([10.0, 20.0]))
    torch.testing.assert_close(low.refine(*args, image=image, generator=torch.Generator().manual_seed(0)),
                               ref.refine(*args, image=image, generator=torch.Generator().manual_seed(0)),
                               atol=1e-4, rtol=0)
    # save / load round trip
    pipe.save_pretrained(tmp_path / "refiner")
    loaded = RefinePipeline.from_pretrained(tmp_path / "refiner")
    assert loaded.config.resolution == 32 and loaded.unet.config.in_channels == 17
    torch.testing.assert_close(
        loaded.refine(frames, torch.tensor([10.0, 20.0]), image=image, generator=torch.Generator().manual_seed(0)),
        out, atol=1e-5, rtol=0)
    with pytest.raises(Hi3DError, match="strength"):
        pipe.refine(frames, 0.0, strength=0.5)  # release_blend has no strength
    with pytest.raises(Hi3DError, match="strength"):
        RefinePipeline.from_components(comps, tiny_cfg(start="sdedit")).refine(frames, 0.0, strength=0.0)


def test_refine_each_video_from_its_own_generator(comps):
    """Per-video generators: video b's refinement depends on its generator only — all of its noise (condition
    augmentation, posterior sample, ε₀), not the first video's generator."""
    pipe = RefinePipeline.from_components(comps, tiny_cfg(num_inference_steps=2))
    frames = (batch(B=2, size=16)["frames"] + 1) / 2
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    both = pipe.refine(frames, torch.tensor([10.0, 20.0]), generator=gens)
    alone = pipe.refine(frames[1:], torch.tensor([20.0]), generator=[torch.Generator().manual_seed(4)])
    torch.testing.assert_close(both[1:], alone, atol=2e-4, rtol=0)
    other = pipe.refine(frames[1:], torch.tensor([20.0]), generator=[torch.Generator().manual_seed(3)])
    assert (other[:, 1:] - alone[:, 1:]).abs().max() > 1e-3  # the seed matters


def test_strength_controls_how_far_from_the_stage1_frames(comps):
    frames = (batch(B=1, size=32)["frames"] + 1) / 2
    dist = []
    for strength in (0.2, 1.0):
        pipe = RefinePipeline.from_components(comps, tiny_cfg(num_inference_steps=5, replace_first_frame=False,
                                                              start="sdedit"))
        out = pipe.refine(frames, 0.0, generator=torch.Generator().manual_seed(0), strength=strength)
        dist.append(float((out - frames).abs().mean()))
    assert dist[0] < dist[1]


def test_load_from_svd_layout_folder_widens_and_adapts(tmp_path):
    from hi3d.pipelines.orbit import OrbitPipeline

    cfg = tiny_cfg()
    svd_like = stage1.tiny_components(stage1.Stage1Config(num_frames=3, slots=list(SVD_SLOTS), tiny=cfg.tiny))
    folder = tmp_path / "svd"
    OrbitPipeline.from_components(svd_like, stage1.Stage1Config(num_frames=3, slots=list(SVD_SLOTS))).save_pretrained(folder)
    (folder / stage1.PIPELINE_FILE).unlink()  # a plain SVD folder has no hi3d config: slots = SVD's
    tiny_depth_estimator(DepthConfig(input_size=32)).save_pretrained(tmp_path / "dpt")
    cfg.depth.pretrained = str(tmp_path / "dpt")
    c = load_stage2(folder, cfg)
    assert c.unet.config.in_channels == 17 and c.unet.add_embedding.linear_1.in_features == 512
    torch.testing.assert_close(c.unet.conv_in.weight[:, [0, 1, 2, 3, 13, 14, 15, 16]], svd_like.unet.conv_in.weight)
    with pytest.raises(Hi3DError, match="dpt-hybrid-midas"):
        load_stage2(folder, dataclasses.replace(cfg, depth=DepthConfig(pretrained=str(tmp_path / "none"))))
    with pytest.raises(Hi3DError, match="stable-video-diffusion"):
        load_stage2(tmp_path / "missing", cfg)


# ---------------------------------------------------------------------------------------------- training runs
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def stage2_script():
    from test_datasets import load_script

    return load_script("train_stage2")


@pytest.fixture(scope="module")
def orbit_dataset(tmp_path_factory):
    from test_datasets import synthetic_orbit

    from hi3d.data.datasets import DataConfig, OrbitDataset
    from hi3d.data.orbit import save_orbit

    root = tmp_path_factory.mktemp("orbits2")
    for k in range(4):
        save_orbit(synthetic_orbit(8, 16, 16, elevation=5.0 * k, tag=k), root / f"obj{k}", sheet=False)
    return OrbitDataset(DataConfig(root=str(root), resolution=16, num_frames=2, rotate=True, seed=0))


def stage2_overrides(root, out, **kw):
    base = {"data.root": root, "train.output_dir": out, "model.resolution": 16, "data.resolution": 16,
            "model.num_frames": 2, "data.num_frames": 2, "model.num_inference_steps": 2, "model.depth.input_size": 32,
            "model.degradation.degrade_size": 16, "train.batch_size": 1, "train.checkpoint_every": 2,
            "train.validate_every": 0, "val_objects": 0, "train.log_object_ids": True}
    return [f"{k}={v}" for k, v in {**base, **kw}.items()]


def test_stage2_configs_give_the_paper_recipe(capsys, orbit_dataset):
    from hi3d.config import load_config

    script = stage2_script()
    paper = load_config(script.Stage2TrainConfig, ROOT / "configs/stage2/paper.yaml")
    t, m = paper.train, paper.model
    assert (t.steps, t.lr, m.resolution, m.num_frames, paper.data.resolution) == (20000, 5e-5, 1024, 16, 1024)
    assert t.batch_size * 8 * t.grad_accum == 8  # one node of 8 GPUs
    assert t.mixed_precision == "bf16" and t.gradient_checkpointing and not m.tiny.enabled
    assert m.slots == ["elevation", "noise_aug"] and in_channels(m) == 17 and m.degradation.degrade_size == 256
    assert (m.min_guidance, m.max_guidance, m.num_inference_steps) == (1.0, 2.0, 25)
    # release.yaml: the release's train-v02.yaml where it disagrees with the paper, the same model otherwise
    release = load_config(script.Stage2TrainConfig, ROOT / "configs/stage2/release.yaml")
    r = release.train
    assert (r.lr, r.mixed_precision, r.ema_decay, r.warmup_steps, r.batch_size) == (1e-5, "fp16", 0.0, 0, 1)
    assert release.model == m and release.data == paper.data
    tiny = load_config(script.Stage2TrainConfig, ROOT / "configs/stage2/tiny_cpu.yaml")
    assert tiny.model.tiny.enabled and tiny.model.resolution <= 64
    cfg_path = str(ROOT / "configs/stage2/tiny_cpu.yaml")
    assert script.main(["--config", cfg_path, f"data.root={orbit_dataset.cfg.root}", "data.resolution=48"]) == 2
    assert "data.resolution (48) differs from model.resolution (32)" in capsys.readouterr().err
    assert script.main(["--config", cfg_path, "model.degradation.sinc_prb=0.2"]) == 2
    assert "did you mean 'model.degradation.sinc_prob'" in capsys.readouterr().err


def test_tiny_stage2_training_loss_falls(orbit_dataset, tmp_path):
    """20 steps (lr 3e-3) on degraded 16² two-frame orbits: the loss at fixed draws falls >= 1.25x (1.43x measured)."""
    from test_training import assert_training_loss_falls

    from hi3d.config import load_config

    cfg = load_config(stage2_script().Stage2TrainConfig, ROOT / "configs/stage2/tiny_cpu.yaml", stage2_overrides(
        orbit_dataset.cfg.root, tmp_path, **{"train.batch_size": 2, "train.lr": 3e-3, "train.warmup_steps": 2,
                                             "train.checkpoint_every": 1000, "data.rotate": False}))
    assert_training_loss_falls(Stage2Task(cfg.model), cfg)


@pytest.mark.slow  # ~1 min on an idle 2-core CPU
def test_stage2_resume_equals_uninterrupted(orbit_dataset, tmp_path):
    from hi3d.config import load_config
    from hi3d.data.datasets import build_dataset
    from hi3d.training.loop import train

    script = stage2_script()

    def run(out, steps, resume=False):
        cfg = load_config(script.Stage2TrainConfig, ROOT / "configs/stage2/tiny_cpu.yaml", stage2_overrides(
            orbit_dataset.cfg.root, out, **{"train.steps": steps, "train.resume": resume}))
        return train(cfg.train, Stage2Task(cfg.model), build_dataset(cfg.data), record_config=cfg)

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    assert resumed.step == 4 and len(resumed.losses) == 2
    a, b = full.unet.state_dict(), resumed.unet.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert full.losses[2:] == pytest.approx(resumed.losses, abs=1e-6)  # same degradations after resume
    assert (tmp_path / "b" / "final" / "depth" / "config.json").is_file()


@pytest.mark.slow  # ~30 s on an idle 2-core CPU, minutes under load
def test_stage2_two_process_accelerate_launch_sees_different_data(orbit_dataset, tmp_path):
    import json

    from test_datasets import launch_two_cpu_processes

    out = tmp_path / "run"
    logs = launch_two_cpu_processes("train_stage2.py", "configs/stage2/tiny_cpu.yaml", stage2_overrides(
        orbit_dataset.cfg.root, out, **{"train.steps": 3, "train.checkpoint_every": 3}), out, timeout=900)
    assert logs[0].keys() == logs[1].keys() == {"0", "1", "2"}
    assert all(logs[0][s] != logs[1][s] for s in logs[0])
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert (out / "final" / "unet" / "config.json").is_file()


OVERFIT_STEPS = 400


@pytest.mark.slow  # ~4 min (OMP_NUM_THREADS=1 on a loaded 2-core CPU)
def test_tiny_refiner_overfits_two_degraded_real_orbits(bunny_path, spider_path, tmp_path):
    """Loss on two degraded orbits of real objects falls >= 5x and the refined orbit is closer to the clean one
    than the degraded input is. The tiny VAE is random (its decode(encode(x)) is ~7 dB from x), so closeness
    is measured where it can be: against decode(encode(clean)), with the degraded input also passed through
    the VAE (pixel PSNRs reported too)."""
    import json

    from hi3d.config import load_config
    from hi3d.data.datasets import build_dataset, first_samples
    from hi3d.data.orbit import save_orbit
    from hi3d.data.render import RenderConfig, render_orbit
    from hi3d.models.svd import decode_latents, encode_frames
    from hi3d.training.loop import psnr, train

    cfg = load_config(stage2_script().Stage2TrainConfig, ROOT / "configs/stage2/tiny_cpu.yaml", [
        f"data.root={tmp_path / 'orbits'}", f"train.output_dir={tmp_path / 'run'}", f"train.steps={OVERFIT_STEPS}",
        "data.rotate=false", "train.validate_every=200", "train.checkpoint_every=200", "model.num_inference_steps=25"])
    task = Stage2Task(cfg.model)
    with torch.no_grad():  # a trained VAE's posterior is sharp; the random tiny one's std (~1) would make the
        task.vae.quant_conv.weight[4:] = 0  # sampled training latents (mean ~0.14) unlearnable noise
        task.vae.quant_conv.bias[4:] = -20.0  # logvar -20: std 5e-5
    # render after building the model: importing torch._dynamo (diffusers) after EGL rendering segfaults
    for name, path, elevation in (("bunny", bunny_path, 20.0), ("spider", spider_path, 5.0)):
        orbit = render_orbit(path, RenderConfig(num_views=16, resolution=64, elevation=elevation, normals=False,
                                                depth=False, contact_sheet=False))
        save_orbit(orbit, tmp_path / "orbits" / name, sheet=False)
    dataset = build_dataset(cfg.data)
    batch = first_samples(dataset, 2)
    clean = (batch["frames"] + 1) / 2
    with torch.no_grad():  # scaling_factor = 1 / std of the latents, as chosen for SD's VAE (random VAE: ~0.14)
        unscaled = encode_frames(task.vae, batch["frames"], sample=False) / task.vae.config.scaling_factor
        task.vae.register_to_config(scaling_factor=1.0 / float(unscaled.std()))
    degraded = task.degrade(batch, torch.Generator().manual_seed(123))

    def vae_roundtrip(x01):
        with torch.no_grad():
            return ((decode_latents(task.vae, encode_frames(task.vae, x01 * 2 - 1, sample=False)) + 1) / 2).clamp(0, 1)

    def eval_loss(unet, draws=16):
        with torch.no_grad():
            return float(sum(task.training_loss(unet, batch, torch.Generator().manual_seed(1000 + k))
                             for k in range(draws)) / draws)

    def refine(unet):
        pipe = RefinePipeline(unet, task.vae, task.image_encoder, task.feature_extractor, task.depth, cfg.model)
        return pipe.refine(degraded, batch["elevation"], image=clean[:, 0], generator=torch.Generator().manual_seed(0))

    clean_vae, degraded_vae = vae_roundtrip(clean)[:, 1:], vae_roundtrip(degraded)[:, 1:]
    loss0, out0 = eval_loss(task.unet), refine(task.unet)[:, 1:]
    result = train(cfg.train, task, dataset, dict(batch), record_config=cfg)
    loss1, out1 = eval_loss(result.unet), refine(result.unet)[:, 1:]
    report = {"steps": OVERFIT_STEPS, "loss_before": loss0, "loss_after": loss1, "loss_ratio": loss0 / loss1,
              "psnr_degraded_vs_clean": psnr(degraded[:, 1:], clean[:, 1:]),
              "psnr_refined_vs_clean_before": psnr(out0, clean[:, 1:]), "psnr_refined_vs_clean": psnr(out1, clean[:, 1:]),
              "psnr_vae_degraded_vs_vae_clean": psnr(degraded_vae, clean_vae),
              "psnr_refined_vs_vae_clean_before": psnr(out0, clean_vae), "psnr_refined_vs_vae_clean": psnr(out1, clean_vae),
              "psnr_vae_ceiling": psnr(clean_vae, clean[:, 1:])}
    print("overfit:", json.dumps(report))
    (tmp_path / "run" / "overfit.json").write_text(json.dumps(report))
    assert loss0 / loss1 >= 5
    assert report["psnr_refined_vs_vae_clean"] > report["psnr_vae_degraded_vs_vae_clean"]
    assert report["psnr_refined_vs_vae_clean"] > report["psnr_refined_vs_vae_clean_before"] + 3
