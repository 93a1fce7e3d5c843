import copy
import dataclasses

import pytest
import torch

from hi3d.errors import Hi3DError
from hi3d.models import stage1
from hi3d.models.conditioning import SVD_SLOTS, added_time_ids
from hi3d.models.depth import DepthConfig, tiny_depth_estimator
from hi3d.models.stage2 import (Stage2Config, Stage2Task, frame_conditions, in_channels, load_stage2,
                                tiny_components, widen_for_stage2)
from hi3d.models.stage1 import TinyConfig
from hi3d.models.svd import unet_forward
from hi3d.pipelines.refine import RefinePipeline, upsample


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
        pipe.refine(frames, 0.0, strength=0.0)


def test_strength_controls_how_far_from_the_stage1_frames(comps):
    frames = (batch(B=1, size=32)["frames"] + 1) / 2
    dist = []
    for strength in (0.2, 1.0):
        pipe = RefinePipeline.from_components(comps, tiny_cfg(num_inference_steps=5, replace_first_frame=False))
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


def test_convert_stage2_checkpoint_every_key_mapped_outputs_equal(comps, tmp_path):
    from hi3d.models.convert import key_map, layout_of, to_sgm
    from hi3d.models.convert_stage2 import convert_stage2

    src = comps
    dst = tiny_components(tiny_cfg(tiny=TinyConfig(enabled=True, seed=7)))
    mods = lambda c: {"unet": c.unet, "vae": c.vae, "image_encoder": c.image_encoder}  # noqa: E731
    assert not torch.equal(dst.unet.conv_in.weight, src.unet.conv_in.weight)
    sd = to_sgm(mods(src))
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 17
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape[1] == 512
    sd["conditioner.embedders.2.midas.scratch.output_conv.0.weight"] = torch.zeros(2, 2)  # depth embedder: ignored
    sd["conditioner.embedders.0.open_clip.model.ln_final.weight"] = torch.zeros(2)
    n_keys = len(key_map(mods(dst), layout_of(dst.unet, dst.vae)))
    report = convert_stage2(None, tmp_path / "hi3d-stage2", depth=src.depth, sd=sd, modules=mods(copy.deepcopy(dst)))
    assert report.leftover == [] and report.ignored == 2 and report.mapped == len(set(sd)) - 2
    assert report.mapped <= n_keys
    loaded = RefinePipeline.from_pretrained(tmp_path / "hi3d-stage2")
    for name in ("unet", "vae", "image_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(src, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    frames = (batch(size=16)["frames"] + 1) / 2
    ref = RefinePipeline.from_components(src, dataclasses.replace(tiny_cfg(), num_inference_steps=2))
    loaded.config.num_inference_steps = 2
    run = lambda p: p.refine(frames, torch.tensor([5.0, 9.0]), generator=torch.Generator().manual_seed(0), size=32)  # noqa: E731
    torch.testing.assert_close(run(loaded), run(ref), atol=1e-5, rtol=0)
    with pytest.raises(Hi3DError, match="stage-1"):
        stage1_like = dict(sd)
        stage1_like["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 8, 3, 3)
        convert_stage2(None, tmp_path / "x", depth=src.depth, sd=stage1_like, modules=mods(copy.deepcopy(dst)))
