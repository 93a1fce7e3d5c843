import copy

import pytest
import torch

from hi3d.errors import ConfigError, Hi3DError
from hi3d.models.conditioning import (
    SVD_SLOTS,
    SlotTimeProjection,
    adapt_added_time_projection,
    added_time_ids,
    projection_input_dim,
    sgm_timestep_embedding,
    widen_conv_in,
)
from hi3d.models.stage1 import Stage1Config, TinyConfig, load_stage1, tiny_components
from hi3d.models.svd import unet_forward
from hi3d.training.stage1 import Stage1Task


def tiny_cfg(**kw) -> Stage1Config:
    return Stage1Config(num_frames=2, resolution=32, num_inference_steps=2, tiny=TinyConfig(enabled=True), **kw)


@pytest.fixture(scope="module")
def comps():
    return tiny_components(tiny_cfg())


def unet_inputs(unet, B=2, F=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, F, 4, 8, 8, generator=g), torch.full((B,), 0.3), torch.randn(B, F, 4, 8, 8, generator=g),
            torch.randn(B, 1, unet.config.cross_attention_dim, generator=g))


def test_slot_layout_matches_config(comps):
    cfg = tiny_cfg()
    assert cfg.slots == ["constant", "elevation", "noise_aug"]
    assert comps.unet.add_embedding.linear_1.in_features == projection_input_dim(cfg.slots) == 768
    ids = added_time_ids(cfg.slots, torch.tensor([10.0, -5.0]), torch.tensor([0.02, 0.1]), constant_value=3.0)
    assert torch.allclose(ids, torch.tensor([[3.0, 10.0, 0.02], [3.0, -5.0, 0.1]]))
    stage2 = tiny_components(tiny_cfg(slots=["elevation", "noise_aug"]))
    assert stage2.unet.add_embedding.linear_1.in_features == 512
    ids2 = added_time_ids(["elevation", "noise_aug"], torch.tensor([7.0]), torch.tensor(0.02))
    assert torch.allclose(ids2, torch.tensor([[7.0, 0.02]]))
    with pytest.raises(ConfigError):
        added_time_ids(["elevation", "azimuth"], torch.tensor([1.0]), torch.tensor(0.0))


def test_elevation_changes_unet_output(comps):
    x, c, concat, clip = unet_inputs(comps.unet)
    slots = ["constant", "elevation", "noise_aug"]
    out = [unet_forward(comps.unet, x, c, concat, clip, added_time_ids(slots, torch.full((2,), e), torch.tensor(0.02)))
           for e in (0.0, 0.0, 30.0)]
    assert torch.equal(out[0], out[1])
    assert (out[0] - out[2]).abs().max() > 1e-4


def test_adapt_projection_from_svd_layout(comps):
    unet = copy.deepcopy(comps.unet)  # treat its 3 slots as SVD's [fps, motion_bucket, noise_aug]
    old = unet.add_embedding.linear_1.weight.clone()
    adapt_added_time_projection(unet, SVD_SLOTS, ["elevation", "noise_aug"])
    new = unet.add_embedding.linear_1.weight
    assert new.shape[1] == 512 and unet.config.projection_class_embeddings_input_dim == 512
    assert torch.equal(new[:, 256:], old[:, 512:])  # noise_aug copied
    assert new[:, :256].abs().max() == 0  # elevation starts at zero: no effect until trained
    x, c, concat, clip = unet_inputs(unet)
    a = unet_forward(unet, x, c, concat, clip, torch.tensor([[0.0, 0.02], [0.0, 0.02]]))
    b = unet_forward(unet, x, c, concat, clip, torch.tensor([[45.0, 0.02], [-9.0, 0.02]]))
    assert torch.equal(a, b)


def test_widen_conv_in_keeps_output(comps):
    unet = copy.deepcopy(comps.unet).double()  # float64: only summation order may differ
    x, c, concat, clip = (t.double() for t in unet_inputs(unet))
    ids = torch.tensor([[0.0, 10.0, 0.02]] * 2)
    ref = unet_forward(unet, x, c, concat, clip, ids)
    widen_conv_in(unet, 17, old_positions=[0, 1, 2, 3, 13, 14, 15, 16])
    depth = torch.randn(2, 2, 9, 8, 8, dtype=torch.float64)
    out = unet_forward(unet, x, c, torch.cat([depth, concat], 2), clip, ids)
    assert unet.config.in_channels == 17
    assert (out - ref).abs().max() < 1e-12
    assert unet.conv_in.weight[:, 4:13].abs().max() == 0


def test_training_loss_seeded_and_differentiable(comps):
    task = Stage1Task(tiny_cfg(), copy.deepcopy(comps))
    g = torch.Generator().manual_seed(0)
    batch = {"frames": torch.rand(2, 2, 3, 32, 32, generator=g) * 2 - 1, "elevation": torch.tensor([0.0, 30.0])}
    l1 = task.training_loss(task.unet, batch, torch.Generator().manual_seed(5))
    l2 = task.training_loss(task.unet, batch, torch.Generator().manual_seed(5))
    l3 = task.training_loss(task.unet, batch, torch.Generator().manual_seed(6))
    assert l1.ndim == 0 and torch.isfinite(l1) and l1 == l2 and l1 != l3
    l1.backward()
    grads = [p.grad for p in task.unet.parameters() if p.grad is not None]
    assert len(grads) == len(list(task.unet.parameters())) and any(gr.abs().sum() > 0 for gr in grads)
    assert {id(m) for m in task.frozen_modules()} == {id(task.vae), id(task.image_encoder)}


def test_condition_dropout_zeroes_clip_and_latent(comps):
    frames = torch.rand(3, 2, 3, 32, 32) * 2 - 1
    elev = torch.tensor([0.0, 10.0, 20.0])
    z, concat, clip, ids = Stage1Task(tiny_cfg(cond_dropout=1.0), comps).conditions(frames, elev, torch.Generator())
    assert clip.abs().max() == 0 and concat.abs().max() == 0 and torch.equal(ids[:, 1], elev)
    z, concat, clip, ids = Stage1Task(tiny_cfg(cond_dropout=0.0), comps).conditions(frames, elev, torch.Generator())
    assert clip.abs().min(dim=-1).values.max() > 0 or clip.abs().max() > 0
    assert concat.shape == z.shape == (3, 2, 4, 8, 8) and torch.equal(concat[:, 0], concat[:, 1])
    assert ((ids[:, 2] > 0) & (ids[:, 2] < 1)).all()  # exp(N(-3, 0.5²)) noise-aug strengths


def test_trainable_params_and_checkpointing(comps):
    task = Stage1Task(tiny_cfg(trainable_params=["time_stack", "temporal"], gradient_checkpointing=True),
                      copy.deepcopy(comps))
    trainable = [n for n, p in task.unet.named_parameters() if p.requires_grad]
    assert trainable and all("temporal" in n for n in trainable)
    assert task.unet.is_gradient_checkpointing
    # checkpointing recomputes activations in backward: same loss and gradients as without
    plain = Stage1Task(tiny_cfg(), copy.deepcopy(comps))
    ckpt = Stage1Task(tiny_cfg(gradient_checkpointing=True), copy.deepcopy(comps))
    batch = {"frames": torch.rand(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1,
             "elevation": torch.tensor([12.0])}
    losses = []
    for t in (plain, ckpt):
        t.unet.train()
        losses.append(t.training_loss(t.unet, batch, torch.Generator().manual_seed(2)))
        losses[-1].backward()
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    g0, g1 = (t.unet.conv_in.weight.grad for t in (plain, ckpt))
    assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-7) and g0.abs().max() > 0


def test_missing_weights_folder_is_one_clear_error(tmp_path):
    with pytest.raises(Hi3DError, match="stabilityai/stable-video-diffusion-img2vid-xt.*diffusers format"):
        load_stage1(tmp_path / "nope")
    (tmp_path / "svd" / "unet").mkdir(parents=True)
    (tmp_path / "svd" / "unet" / "config.json").write_text("{}")
    with pytest.raises(Hi3DError, match="missing vae, image_encoder, feature_extractor"):
        load_stage1(tmp_path / "svd")
    with pytest.raises(Hi3DError, match="not set"):
        Stage1Task(Stage1Config())


def test_load_svd_folder_adapts_slots(comps, tmp_path):
    svd = tmp_path / "svd"
    comps.unet.save_pretrained(svd / "unet")
    comps.vae.save_pretrained(svd / "vae")
    comps.image_encoder.save_pretrained(svd / "image_encoder")
    comps.feature_extractor.save_pretrained(svd / "feature_extractor")
    same = load_stage1(svd, tiny_cfg())
    assert torch.equal(same.unet.add_embedding.linear_1.weight, comps.unet.add_embedding.linear_1.weight)
    by_name = load_stage1(svd, tiny_cfg(time_ids_init="by_name")).unet.add_embedding.linear_1.weight
    old = comps.unet.add_embedding.linear_1.weight
    assert by_name[:, :512].abs().max() == 0 and torch.equal(by_name[:, 512:], old[:, 512:])
    two = load_stage1(svd, tiny_cfg(slots=["elevation", "noise_aug"]))
    assert two.unet.add_embedding.linear_1.in_features == 512
    assert torch.equal(two.unet.add_embedding.linear_1.weight[:, 256:],
                       comps.unet.add_embedding.linear_1.weight[:, 512:])


def test_slot_embeddings_match_diffusers_and_release_aesthetic_layout(comps):
    ids = torch.tensor([[5.5, 20.0, 0.02], [4.0, -10.0, 0.3]])
    ref = comps.unet.add_time_proj(ids.flatten())  # diffusers Timesteps(256, True, 0)
    ours = SlotTimeProjection(["constant", "elevation", "noise_aug"])(ids.flatten())
    assert torch.allclose(ours, ref, atol=1e-6)
    aes = SlotTimeProjection(["aesthetic", "elevation", "noise_aug"])(ids.flatten()).reshape(2, 3, 256)
    assert torch.allclose(aes[:, 1:], ref.reshape(2, 3, 256)[:, 1:], atol=1e-6)
    a = ids[:, 0]
    half = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(127) / 127)
    expect = torch.cat([a[:, None], torch.cos(100 * a[:, None] * half), torch.sin(100 * a[:, None] * half),
                        torch.zeros(2, 1)], -1)
    assert torch.allclose(aes[:, 0], expect, atol=1e-4)
    assert sgm_timestep_embedding(torch.tensor([3.0]), 255).shape == (1, 255)
    c = tiny_components(tiny_cfg(slots=["aesthetic", "elevation", "noise_aug"], constant_value=5.0))
    assert isinstance(c.unet.add_time_proj, SlotTimeProjection)
