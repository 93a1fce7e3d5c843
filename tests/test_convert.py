"""Checkpoint conversion (``hi3d.models.convert``, ``convert_stage2``) checked against the released checkpoints'
tensor list (``release-keys/`` in the shared folder) and against other libraries' implementations."""

import os
from collections import Counter

import pytest
import torch

from hi3d.errors import Hi3DError
from hi3d.models import convert, convert_stage2
from hi3d.models.convert import build_modules, convert_state_dict, default_config_dir, key_map, layout_of
from hi3d.testing import meta_state_dict, release_keys, shared_dir

# what the release-keys README and summary.json say the release holds that hi3d does not convert
EXPECTED_IGNORED = {
    1: {"text side of the OpenCLIP": 6, "text side of the aesthetic CLIP": 6, "condition-VAE copy": 248},
    2: {"text side of the OpenCLIP": 6, "ImageNet classifier of MiDaS": 2, "condition-VAE copy": 248},
}


def keys_or_skip(stage: int) -> dict[str, list[int]]:
    try:
        return release_keys(stage)
    except FileNotFoundError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no release-keys fixture in {shared_dir()} (set HI3D_SHARED)")


def deepspeed_file(sd: dict) -> dict:
    """The release's container: DeepSpeed model states with every key under ``module.``, beside bookkeeping."""
    return {"module": {"module." + k: v for k, v in sd.items()}, "buffer_names": [], "ds_version": "0.12.6",
            "global_steps": 1000, "param_shapes": [{}]}


def convert_release(stage: int, sd: dict, **kw):
    return (convert.convert_stage1_modules if stage == 1 else convert_stage2.convert_stage2_modules)(sd, **kw)


@pytest.mark.parametrize("stage", [1, 2])
def test_released_checkpoints_convert_with_no_flag_and_no_leftover(stage):
    """Every tensor of the released checkpoint (exact keys and shapes, float16 as stored, in the DeepSpeed
    container) is converted or ignored for a stated reason; none is left over; every target tensor is filled
    from the checkpoint (none left at its initial value)."""
    keys = keys_or_skip(stage)
    sd = convert.unwrap_state_dict(deepspeed_file(meta_state_dict(keys)))
    assert sorted(sd) == sorted(keys)
    modules, report = convert_release(stage, sd)
    assert report.leftover == [] and report.filled == []
    used = set(keys) - set(report.ignored)
    assert report.mapped == len(used) and len(used) + len(report.ignored) == len(keys)
    counts = Counter(why for why in report.ignored.values())
    assert {next(e for e in EXPECTED_IGNORED[stage] if why.startswith(e)): n for why, n in counts.items()} \
        == EXPECTED_IGNORED[stage]
    assert set(modules) == ({"unet", "vae", "image_encoder"} | ({"aesthetic_clip", "aesthetic_mlp"} if stage == 1
                                                                else {"depth"}))
    for name, m in modules.items():  # assigned tensors keep the checkpoint's dtype: float16 = came from it
        bad = [k for k, v in m.state_dict().items() if v.dtype != torch.float16 and not k.endswith("position_ids")]
        assert bad == [], (name, bad[:3])
    unet = modules["unet"]
    assert unet.conv_in.in_channels == (8 if stage == 1 else 17)
    assert unet.add_embedding.linear_1.in_features == (768 if stage == 1 else 512)


def test_plain_state_dict_and_lightning_container_unwrap():
    sd = {"model.diffusion_model.out.2.weight": torch.zeros(2), "step": 3}
    assert convert.unwrap_state_dict(sd).keys() == {"model.diffusion_model.out.2.weight"}
    assert convert.unwrap_state_dict({"state_dict": sd, "epoch": 1}).keys() == {"model.diffusion_model.out.2.weight"}
    with pytest.raises(Hi3DError, match="not a state dict"):
        convert.unwrap_state_dict([1, 2])


def test_release_vae_names_match_diffusers_single_file_converter():
    """diffusers' own LDM-VAE converter on the release's ``first_stage_model.*`` gives, for every VAE target, the
    source our table names (paper size, meta tensors)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    keys = keys_or_skip(1)
    vae = build_modules(default_config_dir(), "image")["vae"]
    ours = {k[len("vae."):]: src for k, (src, _) in key_map({"vae": vae}, convert.Layout(vae_levels=4)).items()}
    src = [k for k in keys if k.startswith("first_stage_model.")]
    # one-element tensors tagged with their index (of the source key's rank, so diffusers' reshapes apply)
    tagged = {k: torch.full([1] * len(keys[k]), float(i)) for i, k in enumerate(src)}
    ref = convert_ldm_vae_checkpoint(tagged, dict(vae.config))
    assert sorted(ref) == sorted(ours)
    for k, v in ref.items():
        assert ours[k] == src[int(v.flatten()[0])], k


def unet_release_sd(with_ema: bool) -> dict:
    keys = {k: s for k, s in keys_or_skip(1).items() if k.startswith("model.diffusion_model.")}
    sd = meta_state_dict(keys)
    if with_ema:  # generative-models' LitEma: buffer "model_ema.<name without dots>" of every diffusion_model parameter
        sd.update({"model_ema." + k[len("model."):].replace(".", ""): torch.empty(s, device="meta") for k, s in keys.items()})
        sd.update({"model_ema.decay": torch.empty((), device="meta"), "model_ema.num_updates": torch.empty((), device="meta")})
    return sd


@pytest.fixture(scope="module")
def meta_unet():
    return build_modules(default_config_dir(), "image")["unet"]


def test_ema_converts_ema_weights_and_ignores_the_raw_ones(meta_unet):
    """--ema: the UNet is filled from the float32 EMA copies (the raw float16 weights are ignored, not left over);
    without --ema the raw weights are converted and the EMA copies ignored."""
    sd, lay = unet_release_sd(with_ema=True), convert.Layout()
    report = convert_state_dict(sd, {"unet": meta_unet}, use_ema=True, layout=lay)
    assert report.leftover == []
    assert {v.dtype for v in meta_unet.state_dict().values()} == {torch.float32}
    raw = [k for k in sd if k.startswith("model.diffusion_model.")]
    assert all(report.ignored[k] == convert.RAW_REPLACED for k in raw)
    assert report.mapped == len(raw)
    report = convert_state_dict(sd, {"unet": meta_unet}, use_ema=False, layout=lay)
    assert report.leftover == [] and report.mapped == len(raw)
    assert {v.dtype for v in meta_unet.state_dict().values()} == {torch.float16}
    assert sum(why == convert.EMA_UNUSED for why in report.ignored.values()) == len(raw) + 2


def test_ema_requested_but_absent_is_one_clear_error(meta_unet):
    with pytest.raises(Hi3DError, match=r"no EMA weights \(no 'model_ema\.\*' keys") as e:
        convert_state_dict(unet_release_sd(with_ema=False), {"unet": meta_unet}, use_ema=True, layout=convert.Layout())
    assert "\n" not in str(e.value)


def test_leftover_and_missing_tensors_are_reported(meta_unet):
    sd = unet_release_sd(with_ema=False)
    sd["model.diffusion_model.extra_layer.weight"] = torch.empty(2, device="meta")
    assert convert_state_dict(sd, {"unet": meta_unet}, layout=convert.Layout()).leftover == \
        ["model.diffusion_model.extra_layer.weight"]
    with pytest.raises(Hi3DError, match="1 checkpoint tensors were not converted.*extra_layer"):
        convert.check_leftover(convert_state_dict(sd, {"unet": meta_unet}, layout=convert.Layout()), False, "configs")
    del sd["model.diffusion_model.input_blocks.1.0.time_stack.in_layers.2.weight"]
    with pytest.raises(Hi3DError, match="lacks 1 tensors.*temporal_res_block.conv1"):
        convert_state_dict(sd, {"unet": meta_unet}, layout=convert.Layout())
    sd = {k: v for k, v in meta_state_dict(keys_or_skip(2)).items() if not k.startswith(convert.DEPTH)}
    with pytest.raises(Hi3DError, match="holds no depth model.*--depth"):
        convert_stage2.convert_stage2_modules(sd)
    _, report = convert_stage2.convert_stage2_modules(meta_state_dict(keys_or_skip(2)), own_depth=True)
    assert report.leftover == [] and sum(w == convert_stage2.REPLACED_DEPTH for w in report.ignored.values()) == 368


def test_vae_copy_must_equal_the_first_stage():
    sd = {"first_stage_model.encoder.conv_in.weight": torch.zeros(2), "conditioner.embedders.3.encoder.encoder.conv_in.weight":
          torch.ones(2)}
    with pytest.raises(Hi3DError, match="differs from first_stage_model.encoder.conv_in.weight"):
        convert._check_vae_copy(sd)


def test_paper_size_key_names_match_generative_models():
    """Spot checks of the SVD-XT layout against key names of the published generative-models checkpoints."""
    m = build_modules(default_config_dir(), "video")
    km = {k: s for k, (s, _) in key_map(m, layout_of(m["unet"], m["vae"])).items()}
    expect = {
        "unet.add_embedding.linear_1.weight": "model.diffusion_model.label_emb.0.0.weight",
        "unet.down_blocks.0.resnets.0.temporal_res_block.conv1.weight":
            "model.diffusion_model.input_blocks.1.0.time_stack.in_layers.2.weight",
        "unet.down_blocks.0.downsamplers.0.conv.weight": "model.diffusion_model.input_blocks.3.0.op.weight",
        "unet.down_blocks.1.attentions.1.temporal_transformer_blocks.0.attn2.to_k.weight":
            "model.diffusion_model.input_blocks.5.1.time_stack.0.attn2.to_k.weight",
        "unet.mid_block.resnets.1.time_mixer.mix_factor": "model.diffusion_model.middle_block.2.time_mixer.mix_factor",
        "unet.up_blocks.0.upsamplers.0.conv.weight": "model.diffusion_model.output_blocks.2.1.conv.weight",
        "unet.up_blocks.1.upsamplers.0.conv.weight": "model.diffusion_model.output_blocks.5.2.conv.weight",
        "unet.up_blocks.3.attentions.2.time_pos_embed.linear_2.bias":
            "model.diffusion_model.output_blocks.11.1.time_pos_embed.2.bias",
        "unet.conv_out.weight": "model.diffusion_model.out.2.weight",
        "vae.decoder.up_blocks.0.resnets.2.temporal_res_block.conv2.weight":
            "first_stage_model.decoder.up.3.block.2.time_stack.out_layers.3.weight",
        "vae.decoder.time_conv_out.weight": "first_stage_model.decoder.conv_out.time_mix_conv.weight",
        "vae.decoder.mid_block.resnets.0.time_mixer.mix_factor": "first_stage_model.decoder.mid.block_1.mix_factor",
        "vae.encoder.down_blocks.1.resnets.0.conv_shortcut.weight":
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "vae.encoder.mid_block.attentions.0.to_out.0.weight": "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "image_encoder.vision_model.encoder.layers.31.mlp.fc2.weight":
            "conditioner.embedders.0.open_clip.model.visual.transformer.resblocks.31.mlp.c_proj.weight",
        "image_encoder.visual_projection.weight": "conditioner.embedders.0.open_clip.model.visual.proj",
    }
    for k, v in expect.items():
        assert km[k] == v, k
    assert m["unet"].add_embedding.linear_1.in_features == 768 and m["unet"].conv_in.in_channels == 8


def test_openclip_image_tower_converts_to_transformers_clip():
    """Against open_clip itself: a tiny OpenCLIP ViT (the ViT-H/14 architecture at toy size) converted into
    CLIPVisionModelWithProjection gives the same image embedding."""
    from open_clip.transformer import VisionTransformer
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from hi3d.models.convert import CLIP, Layout

    g = torch.Generator().manual_seed(0)
    oc = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=24).eval()
    with torch.no_grad():
        for p in oc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5)).eval()
    sd = {CLIP + k: v for k, v in oc.state_dict().items()}
    report = convert_state_dict(sd, {"image_encoder": hf}, layout=Layout())
    assert report.leftover == [] and report.mapped == len(sd)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).image_embeds, oc(x), atol=1e-5)


def tiny_midas(g: torch.Generator, size: int, dim: int, fusion: int):
    """A tiny MiDaS DPT-Hybrid in the release's key layout: timm's hybrid ViT (ResNetV2 stem + ViT, the
    ``vit_base_resnet50_384`` architecture at toy size) as ``pretrained.model``, random readout/neck/head tensors."""
    from functools import partial

    from timm.layers import GroupNormAct, StdConv2dSame
    from timm.layers.hybrid_embed import HybridEmbed
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    backbone = ResNetV2(layers=(1, 1, 1), channels=(16, 32, 64), num_classes=0, global_pool="", preact=False,
                        stem_type="same", stem_chs=8, conv_layer=partial(StdConv2dSame, eps=1e-8),
                        norm_layer=partial(GroupNormAct, num_groups=2))
    vit = VisionTransformer(img_size=size, patch_size=1, embed_dim=dim, depth=4, num_heads=2, mlp_ratio=2.0,
                            num_classes=10, embed_layer=partial(HybridEmbed, backbone=backbone)).eval()
    with torch.no_grad():
        for n, p in vit.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in n and n.endswith("weight") else 0.0))
    shapes = {"pretrained.act_postprocess4.4.weight": (32, 32, 3, 3), "pretrained.act_postprocess4.4.bias": (32,)}
    for i in (3, 4):
        shapes.update({f"pretrained.act_postprocess{i}.0.project.0.weight": (dim, 2 * dim),
                       f"pretrained.act_postprocess{i}.0.project.0.bias": (dim,),
                       f"pretrained.act_postprocess{i}.3.weight": (32, dim, 1, 1),
                       f"pretrained.act_postprocess{i}.3.bias": (32,)})
    for i, c in enumerate((16, 32, 32, 32)):
        shapes[f"scratch.layer{i + 1}_rn.weight"] = (fusion, c, 3, 3)
    for r in range(1, 5):
        shapes.update({f"scratch.refinenet{r}.out_conv.weight": (fusion, fusion, 1, 1),
                       f"scratch.refinenet{r}.out_conv.bias": (fusion,)})
        for u in (1, 2):
            for c in (1, 2):
                shapes[f"scratch.refinenet{r}.resConfUnit{u}.conv{c}.weight"] = (fusion, fusion, 3, 3)
                shapes[f"scratch.refinenet{r}.resConfUnit{u}.conv{c}.bias"] = (fusion,)
    for i, (o, c, k) in zip((0, 2, 4), ((fusion // 2, fusion, 3), (32, fusion // 2, 3), (1, 32, 1))):
        shapes.update({f"scratch.output_conv.{i}.weight": (o, c, k, k), f"scratch.output_conv.{i}.bias": (o,)})
    sd = {"pretrained.model." + k: v for k, v in vit.state_dict().items()}
    sd.update({k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()})
    return vit, sd


def midas_forward(vit, w: dict, x: torch.Tensor) -> torch.Tensor:
    """MiDaS ``DPTDepthModel.forward`` for the hybrid backbone written out in plain torch (hooks on ResNet stages
    0, 1 and ViT blocks 2, 3 as MiDaS's ``[0, 1, 8, 11]`` at full size; ``ProjectReadout``; 4 ``FeatureFusionBlock``s;
    ``output_conv`` with the final ReLU of ``non_negative=True``)."""
    import torch.nn.functional as F

    acts = {}
    mods = [vit.patch_embed.backbone.stages[0], vit.patch_embed.backbone.stages[1], vit.blocks[2], vit.blocks[3]]
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: acts.__setitem__(k, o)) for k, m in enumerate(mods)]
    vit.forward_features(x)
    for h in hooks:
        h.remove()

    def readout(t, i):
        p = f"pretrained.act_postprocess{i}."
        feat = F.gelu(F.linear(torch.cat([t[:, 1:], t[:, :1].expand_as(t[:, 1:])], -1), w[p + "0.project.0.weight"],
                               w[p + "0.project.0.bias"]))
        n = int(feat.shape[1] ** 0.5)
        return F.conv2d(feat.transpose(1, 2).reshape(feat.shape[0], -1, n, n), w[p + "3.weight"], w[p + "3.bias"])

    l4 = F.conv2d(readout(acts[3], 4), w["pretrained.act_postprocess4.4.weight"], w["pretrained.act_postprocess4.4.bias"],
                  stride=2, padding=1)
    rn = [F.conv2d(f, w[f"scratch.layer{i + 1}_rn.weight"], padding=1)
          for i, f in enumerate((acts[0], acts[1], readout(acts[2], 3), l4))]

    def rcu(t, p):
        out = F.conv2d(F.relu(t), w[p + "conv1.weight"], w[p + "conv1.bias"], padding=1)
        return F.conv2d(F.relu(out), w[p + "conv2.weight"], w[p + "conv2.bias"], padding=1) + t

    def refine(r, path, skip=None):
        p = f"scratch.refinenet{r}."
        out = path if skip is None else path + rcu(skip, p + "resConfUnit1.")
        out = F.interpolate(rcu(out, p + "resConfUnit2."), scale_factor=2, mode="bilinear", align_corners=True)
        return F.conv2d(out, w[p + "out_conv.weight"], w[p + "out_conv.bias"])

    path = refine(1, refine(2, refine(3, refine(4, rn[3]), rn[2]), rn[1]), rn[0])
    o = F.conv2d(path, w["scratch.output_conv.0.weight"], w["scratch.output_conv.0.bias"], padding=1)
    o = F.interpolate(o, scale_factor=2, mode="bilinear", align_corners=True)
    o = F.relu(F.conv2d(o, w["scratch.output_conv.2.weight"], w["scratch.output_conv.2.bias"], padding=1))
    return F.relu(F.conv2d(o, w["scratch.output_conv.4.weight"], w["scratch.output_conv.4.bias"]))[:, 0]


def test_midas_dpt_hybrid_converts_to_transformers_dpt(tmp_path):
    """Row 3: the checkpoint's MiDaS DPT-Hybrid (``conditioner.embedders.2.model.model.*``) converted into
    ``DPTForDepthEstimation`` with ``configs/stage2/depth.json``'s layout (tiny sizes) predicts what MiDaS's forward
    (timm's hybrid ViT + the DPT neck in plain torch) predicts; the converted folder keeps MiDaS's [-1, 1] input."""
    from transformers import DPTConfig, DPTForDepthEstimation

    from hi3d.models.depth import DepthEstimator

    g = torch.Generator().manual_seed(0)
    size, dim, fusion = 64, 32, 16
    vit, sd = tiny_midas(g, size, dim, fusion)
    full = convert.read_config(convert_stage2.default_config_dir() / "depth.json")
    tiny = {**full, "hidden_size": dim, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 2 * dim,
            "image_size": size, "backbone_out_indices": [0, 1, 2, 3], "neck_hidden_sizes": [16, 32, 32, 32],
            "fusion_hidden_size": fusion, "backbone_featmap_shape": [1, 64, size // 16, size // 16],
            "backbone_config": {**full["backbone_config"], "depths": [1, 1, 1], "hidden_sizes": [16, 32, 64],
                                "embedding_size": 8, "num_groups": 2}}
    hf = DPTForDepthEstimation(DPTConfig(**tiny)).eval()
    report = convert_state_dict({convert.DEPTH + k: v for k, v in sd.items()}, {"depth": hf}, layout=convert.Layout())
    assert report.leftover == [] and len(report.ignored) == 2 and report.mapped == len(sd) - 2  # timm's classifier
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    with torch.no_grad():
        ref, out = midas_forward(vit, sd, x), hf(pixel_values=x).predicted_depth
    assert ref.shape == (2, size, size) and (ref > 0).any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    DepthEstimator(hf).save_pretrained(tmp_path / "depth")
    est = DepthEstimator.from_pretrained(convert_stage2.DepthConfig(pretrained=str(tmp_path / "depth"), input_size=size))
    assert est.mean.flatten().tolist() == [0.5] * 3 and est.std.flatten().tolist() == [0.5] * 3  # [0, 1] -> [-1, 1]
    with torch.no_grad():
        torch.testing.assert_close(est.model(pixel_values=x).predicted_depth, ref, atol=1e-5, rtol=1e-5)


def tiny_release_aesthetic(g: torch.Generator):
    """A tiny OpenAI-CLIP ViT (QuickGELU, open_clip's implementation and key layout, 224² input as ViT-L/14) and
    random LAION-MLP tensors, under the release's ``conditioner.embedders.1.*`` names."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    oc = VisionTransformer(image_size=224, patch_size=32, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16,
                           act_layer=QuickGELU).eval()
    with torch.no_grad():
        for p in oc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    widths = [16, 1024, 128, 64, 16, 1]
    mlp = {}
    for j, i in enumerate((0, 2, 4, 6, 7)):
        mlp[f"layers.{i}.weight"] = torch.randn(widths[j + 1], widths[j], generator=g) / widths[j] ** 0.5
        mlp[f"layers.{i}.bias"] = torch.randn(widths[j + 1], generator=g) * 0.1
    sd = {convert.AES_CLIP + k: v for k, v in oc.state_dict().items()}
    sd.update({convert.AES_MLP + k: v for k, v in mlp.items()})
    sd["conditioner.embedders.1.aesthetic_model.ln_final.weight"] = torch.ones(8)  # text side: ignored
    return oc, mlp, sd


def release_aesthetic(oc, mlp: dict, x: torch.Tensor) -> torch.Tensor:
    """vtdm AesEmbedder.forward on the middle frame ``x [B, 3, H, W]`` in [-1, 1], step by step as released
    (torch resize and crop, per-channel CLIP normalisation, numpy L2 normalisation, the MLP as matrix products)."""
    import numpy as np
    import torch.nn.functional as F

    y = F.interpolate(x, [224, 384], mode="bilinear")
    y = y[:, :, :, 80:304]
    y = (y + 1) * 0.5
    y[:, 0] = (y[:, 0] - 0.48145466) / 0.26862954
    y[:, 1] = (y[:, 1] - 0.4578275) / 0.26130258
    y[:, 2] = (y[:, 2] - 0.40821073) / 0.27577711
    with torch.no_grad():
        a = oc(y).double().numpy()
    l2 = np.atleast_1d(np.linalg.norm(a, 2, -1))
    l2[l2 == 0] = 1
    h = a / np.expand_dims(l2, -1)
    for i in (0, 2, 4, 6, 7):
        h = h @ mlp[f"layers.{i}.weight"].double().numpy().T + mlp[f"layers.{i}.bias"].double().numpy()
    return torch.from_numpy(h[:, 0]).float()


@pytest.fixture(scope="module")
def aesthetic():
    """The tiny release aesthetic embedder and its conversion into ``AestheticScorer``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from hi3d.models.aesthetic import AestheticMLP, AestheticScorer

    oc, mlp, sd = tiny_release_aesthetic(torch.Generator().manual_seed(3))
    full = convert.read_config(default_config_dir() / "aesthetic_clip.json")
    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**full, "hidden_size": 32, "intermediate_size": 64,
                                                           "projection_dim": 16, "num_hidden_layers": 2,
                                                           "num_attention_heads": 2, "patch_size": 32})).eval()
    modules = {"aesthetic_clip": hf, "aesthetic_mlp": AestheticMLP(16)}
    report = convert_state_dict(sd, modules, layout=convert.Layout())
    return oc, mlp, report, AestheticScorer(hf, modules["aesthetic_mlp"].eval())


def test_aesthetic_scorer_is_the_releases_clip_and_laion_mlp(aesthetic):
    """Row 5: the release's aesthetic CLIP (open_clip layout, QuickGELU as OpenAI's ViT-L/14) converted to
    transformers gives open_clip's embedding, and the score equals AesEmbedder's computation written out."""
    oc, mlp, report, scorer = aesthetic
    assert report.leftover == [] and list(report.ignored) == ["conditioner.embedders.1.aesthetic_model.ln_final.weight"]
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 3, 48, 40, generator=g) * 2 - 1  # any input size: the release squeezes it to 224 × 384
    pix = scorer.preprocess(x)
    with torch.no_grad():
        torch.testing.assert_close(scorer.clip(pixel_values=pix).image_embeds, oc(pix), atol=1e-5, rtol=1e-5)
    ref = release_aesthetic(oc, mlp, x.clone())
    assert ref.std() > 1e-3  # the inputs score differently
    torch.testing.assert_close(scorer(x), ref, atol=1e-5, rtol=1e-5)


def test_orbit_pipeline_scores_each_input_and_keeps_a_fixed_option(aesthetic, tmp_path):
    """The stage-1 pipeline's aesthetic slot is the scorer's value of its input image (a fixed constant equal to it
    gives the same frames, another constant different ones); ``aesthetic=fixed`` uses ``constant_value``; the
    scorer is saved in ``aesthetic/`` and loaded back."""
    import dataclasses

    from hi3d.models.stage1 import Stage1Config, TinyConfig, tiny_components
    from hi3d.pipelines.orbit import OrbitPipeline

    scorer = aesthetic[3]
    cfg = Stage1Config(num_frames=2, resolution=32, num_inference_steps=2, tiny=TinyConfig(enabled=True),
                       slots=["aesthetic", "elevation", "noise_aug"], constant_value=5.0)
    pipe = OrbitPipeline.from_components(dataclasses.replace(tiny_components(cfg), aesthetic=scorer), cfg)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    score = float(scorer(image * 2 - 1)[0])
    run = lambda p: p.generate(image, 10.0, [torch.Generator().manual_seed(0)])  # noqa: E731
    frames = run(pipe)
    fixed = lambda v: OrbitPipeline.from_components(pipe.components, dataclasses.replace(cfg, aesthetic="fixed",  # noqa: E731
                                                                                         constant_value=v))
    torch.testing.assert_close(run(fixed(score)), frames, atol=1e-5, rtol=0)
    assert (run(fixed(score + 3.0)) - frames).abs().max() > 1e-4
    pipe.save_pretrained(tmp_path / "stage1")
    loaded = OrbitPipeline.from_pretrained(tmp_path / "stage1")
    assert loaded.aesthetic is not None and loaded.config.aesthetic == "predictor"
    torch.testing.assert_close(loaded.aesthetic_score(image * 2 - 1), torch.tensor([score]), atol=1e-6, rtol=0)
    with pytest.raises(Hi3DError, match="aesthetic='bogus' is not one of"):
        OrbitPipeline.from_pretrained(tmp_path / "stage1", aesthetic="bogus").aesthetic_score(image)


def random_sgm_state_dict(modules: dict, g: torch.Generator, dtype=torch.float16) -> dict:
    """Random tensors under every sgm name the tables give for ``modules`` (fused q/k/v as one tensor, sgm's
    4-d VAE attention weights, OpenCLIP's transposed projection): a tiny stand-in checkpoint for the CLI."""
    shapes: dict[str, list[int]] = {}
    layout = layout_of(modules["unet"], modules["vae"])
    for target, (src, op) in key_map(modules, layout).items():
        name, key = target.split(".", 1)
        s = list(modules[name].state_dict()[key].shape)
        s = {"squeeze_1x1": s + [1, 1], "transpose": s[::-1], "q": [3 * s[0], *s[1:]]}.get(op, s)
        if op not in ("k", "v"):
            shapes[src] = s
    return {k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in shapes.items()}


def test_cli_converts_a_deepspeed_float16_stage1_file_into_a_loadable_folder(tmp_path, aesthetic):
    """scripts/convert_checkpoint.py's stage-1 path on a tiny DeepSpeed float16 file (tiny configs in --config-dir):
    the folder loads with OrbitPipeline, tensors land where the sgm names say, the aesthetic scorer comes along,
    and run.json lists what was ignored and why."""
    import json

    from hi3d.models.stage1 import Stage1Config, TinyConfig, tiny_components
    from hi3d.pipelines.orbit import OrbitPipeline

    c = tiny_components(Stage1Config(num_frames=2, tiny=TinyConfig(enabled=True)))
    scorer = aesthetic[3]
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    for name, conf in {"unet.json": dict(c.unet.config), "vae.json": dict(c.vae.config),
                       "image_encoder.json": c.image_encoder.config.to_dict(),
                       "aesthetic_clip.json": scorer.clip.config.to_dict()}.items():
        (cfg_dir / name).write_text(json.dumps(conf, default=list))
    (cfg_dir / "feature_extractor.json").write_text(json.dumps(c.feature_extractor.to_dict()))
    modules = build_modules(cfg_dir, "video", aesthetic=True)
    sd = random_sgm_state_dict(modules, torch.Generator().manual_seed(6))
    sd["conditioner.embedders.0.open_clip.model.token_embedding.weight"] = torch.zeros(4, 2, dtype=torch.float16)
    torch.save(deepspeed_file(sd), tmp_path / "first_stage.pt")
    out = tmp_path / "stage1"
    assert convert.cli([str(tmp_path / "first_stage.pt"), "--out", str(out), "--config-dir", str(cfg_dir)]) == 0
    run = json.loads((out / "run.json").read_text())
    entry = json.dumps(run)
    assert "text side of the OpenCLIP" in entry and '"leftover": []' in entry
    pipe = OrbitPipeline.from_pretrained(out)
    assert pipe.config.slots == ["aesthetic", "elevation", "noise_aug"] and pipe.aesthetic is not None
    f = lambda t: t.detach().float()  # noqa: E731
    assert torch.equal(f(pipe.unet.conv_in.weight), f(sd["model.diffusion_model.input_blocks.0.0.weight"]))
    q = sd[convert.CLIP + "transformer.resblocks.1.attn.in_proj_weight"].chunk(3)[0]
    assert torch.equal(f(pipe.image_encoder.vision_model.encoder.layers[1].self_attn.q_proj.weight), f(q))
    assert torch.equal(f(pipe.aesthetic.mlp.layers[7].weight), f(sd[convert.AES_MLP + "layers.7.weight"]))
    assert torch.equal(f(pipe.aesthetic.clip.visual_projection.weight), f(sd[convert.AES_CLIP + "proj"]).t())
    with pytest.raises(Hi3DError, match="no EMA weights"):
        convert.cli([str(tmp_path / "first_stage.pt"), "--out", str(tmp_path / "x"), "--config-dir", str(cfg_dir), "--ema"])


def test_cli_stage2_converts_the_checkpoints_depth_model(tmp_path):
    """``--stage 2`` without ``--depth``: the checkpoint's DPT lands in ``depth/`` (tiny DeepSpeed float16 file, tiny
    configs), loadable by RefinePipeline, with MiDaS's [-1, 1] input normalisation."""
    import json

    from hi3d.models.stage1 import TinyConfig
    from hi3d.models.stage2 import Stage2Config, tiny_components
    from hi3d.pipelines.refine import RefinePipeline

    c = tiny_components(Stage2Config(num_frames=2, tiny=TinyConfig(enabled=True)))
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    for name, conf in {"unet.json": dict(c.unet.config), "vae.json": dict(c.vae.config),
                       "image_encoder.json": c.image_encoder.config.to_dict(),
                       "depth.json": c.depth.model.config.to_dict()}.items():
        (cfg_dir / name).write_text(json.dumps(conf, default=list))
    modules = convert_stage2.build_modules(cfg_dir, "video")
    sd = random_sgm_state_dict(modules, torch.Generator().manual_seed(7))
    assert any(k.startswith(convert.DEPTH + "scratch.refinenet4.") for k in sd)
    torch.save(deepspeed_file(sd), tmp_path / "second_stage.pt")
    out = tmp_path / "stage2"
    assert convert_stage2.cli([str(tmp_path / "second_stage.pt"), "--out", str(out), "--config-dir", str(cfg_dir)]) == 0
    pipe = RefinePipeline.from_pretrained(out)
    f = lambda t: t.detach().float()  # noqa: E731
    dpt = pipe.depth.model
    assert torch.equal(f(dpt.neck.fusion_stage.layers[0].projection.weight),
                       f(sd[convert.DEPTH + "scratch.refinenet4.out_conv.weight"]))
    k = sd[convert.DEPTH + "pretrained.model.blocks.0.attn.qkv.weight"].chunk(3)[1]
    assert torch.equal(f(dpt.dpt.encoder.layer[0].attention.attention.key.weight), f(k))
    assert pipe.depth.mean.flatten().tolist() == [0.5] * 3 and pipe.config.depth.input_size == dpt.config.image_size
