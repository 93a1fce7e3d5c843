import copy

import pytest
import torch

from hi3d.errors import Hi3DError
from hi3d.models.conditioning import install_slot_projection
from hi3d.models.convert import (
    build_modules,
    convert_stage1,
    convert_state_dict,
    default_config_dir,
    key_map,
    layout_of,
    read_checkpoint,
    to_sgm,
    vae_kind_of,
)
from hi3d.models.stage1 import Stage1Config, TinyConfig, tiny_components
from hi3d.models.svd import clip_embed, decode_latents, encode_frames, init_weights_, unet_forward
from hi3d.pipelines.orbit import OrbitPipeline


def tiny_cfg(seed):
    return Stage1Config(num_frames=2, resolution=32, num_inference_steps=2,
                        tiny=TinyConfig(enabled=True, seed=seed, layers_per_block=2, unet_channels=[32, 32, 64],
                                        unet_heads=[2, 2, 4]))


@pytest.fixture(scope="module")
def pair():
    """Two tiny component sets with different random weights: the source and the conversion target."""
    return tiny_components(tiny_cfg(0)), tiny_components(tiny_cfg(1))


def modules(c):
    return {"unet": c.unet, "vae": c.vae, "image_encoder": c.image_encoder}


def sgm_checkpoint(c) -> dict:
    """A generative-models-style stage-1 state dict of ``c``, laid out like the release: SVD's first stage has
    no quant_conv (the concat-latent VAE copy in the conditioner has one), plus tensors the converter must
    know to ignore (OpenCLIP text leftovers, the VAE copy, Hi3D's aesthetic embedder)."""
    sd = to_sgm(modules(c))
    q = {k: sd.pop(k) for k in list(sd) if k.startswith("first_stage_model.quant_conv.")}
    for k, v in q.items():
        sd[k.replace("first_stage_model.", "conditioner.embedders.3.encoder.")] = v
    enc = {k: v for k, v in sd.items() if k.startswith("first_stage_model.encoder.")}
    sd.update({k.replace("first_stage_model.", "conditioner.embedders.3.encoder."): v for k, v in enc.items()})
    g = torch.Generator().manual_seed(9)
    for k in ("conditioner.embedders.0.open_clip.model.token_embedding.weight",
              "conditioner.embedders.0.open_clip.model.ln_final.weight", "conditioner.embedders.0.open_clip.model.logit_scale",
              "conditioner.embedders.1.aesthetic_mlp.layers.0.weight"):
        sd[k] = torch.randn(3, 2, generator=g)
    return sd


def outputs(c):
    g = torch.Generator().manual_seed(0)
    x, concat = torch.randn(1, 2, 4, 8, 8, generator=g), torch.randn(1, 2, 4, 8, 8, generator=g)
    clip_in = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        clip = clip_embed(c.image_encoder, c.feature_extractor, clip_in)
        return (unet_forward(c.unet, x, torch.tensor([0.1]), concat, clip, torch.tensor([[0.0, 20.0, 0.02]])),
                clip, decode_latents(c.vae, x), encode_frames(c.vae, clip_in[:, None], sample=False))


def test_every_key_mapped_none_left_over_outputs_equal(pair):
    src, dst = pair[0], copy.deepcopy(pair[1])
    sd = sgm_checkpoint(src)
    assert vae_kind_of(sd) == "video"
    report = convert_state_dict(sd, modules(dst))
    assert report.leftover == [] and report.filled == []
    n_targets = sum(len([k for k in m.state_dict() if not k.endswith("position_ids")]) for m in modules(dst).values())
    layers = dst.image_encoder.config.num_hidden_layers
    assert report.mapped == n_targets - 4 * layers  # per CLIP layer, q/k/v weights and biases come from 2 in_proj tensors
    for name, m in modules(dst).items():
        ref = modules(src)[name].state_dict()
        for k, v in m.state_dict().items():
            assert torch.equal(v, ref[k]), f"{name}.{k}"
    for a, b in zip(outputs(src), outputs(dst)):
        assert torch.equal(a, b)


def test_image_decoder_variant_and_identity_quant_conv():
    from diffusers import AutoencoderKL

    c = tiny_components(tiny_cfg(0))
    vae = AutoencoderKL(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4)
    init_weights_(vae, torch.Generator().manual_seed(2))
    src = {"unet": c.unet, "vae": vae, "image_encoder": c.image_encoder}
    sd = to_sgm(src)
    assert vae_kind_of(sd) == "image"
    # independent reference for the LDM VAE names: diffusers' own single-file converter
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref = convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if k.startswith("first_stage_model.")}, dict(vae.config))
    assert sorted(ref) == sorted(vae.state_dict())
    assert all(torch.equal(ref[k].reshape(v.shape), v) for k, v in vae.state_dict().items())
    for k in [k for k in sd if "quant_conv" in k]:
        del sd[k]
    dst_vae = AutoencoderKL.from_config(vae.config)
    report = convert_state_dict(sd, {**src, "vae": dst_vae})
    assert report.leftover == [] and sorted(report.filled) == ["vae.post_quant_conv.bias", "vae.post_quant_conv.weight",
                                                               "vae.quant_conv.bias", "vae.quant_conv.weight"]
    for k, v in dst_vae.state_dict().items():
        if "quant_conv" not in k:
            assert torch.equal(v, vae.state_dict()[k]), k
    x = torch.randn(1, 4, 8, 8)
    assert torch.allclose(dst_vae.post_quant_conv(x), x, atol=1e-6)  # identity where the checkpoint has none


def test_leftover_and_missing_tensors_are_reported(pair, tmp_path):
    sd = sgm_checkpoint(pair[0])
    sd["model.diffusion_model.extra_layer.weight"] = torch.zeros(2)
    with pytest.raises(Hi3DError, match="not converted.*extra_layer"):
        convert_stage1("x.pt", tmp_path / "out", sd=sd, modules=modules(copy.deepcopy(pair[1])))
    del sd["model.diffusion_model.extra_layer.weight"]
    del sd["model.diffusion_model.input_blocks.1.0.time_stack.in_layers.2.weight"]
    with pytest.raises(Hi3DError, match="lacks 1 tensors.*temporal_res_block.conv1"):
        convert_state_dict(sd, modules(copy.deepcopy(pair[1])))


def test_convert_to_pipeline_folder(pair, tmp_path):
    src = pair[0]
    out = tmp_path / "hi3d-stage1"
    ckpt = tmp_path / "first_stage.pt"
    torch.save({"module": {"module." + k: v for k, v in sgm_checkpoint(src).items()}}, ckpt)  # DeepSpeed layout
    sd = read_checkpoint(ckpt)
    assert all(not k.startswith("module.") for k in sd)
    report = convert_stage1(ckpt, out, sd=sd, modules=modules(copy.deepcopy(pair[1])))
    assert report.leftover == []
    cfg = tiny_cfg(0)
    cfg.slots, cfg.constant_value = ["aesthetic", "elevation", "noise_aug"], 5.0  # the release's layout
    ref_comps = copy.deepcopy(src)
    install_slot_projection(ref_comps.unet, cfg.slots)
    ref = OrbitPipeline.from_components(ref_comps, cfg)
    loaded = OrbitPipeline.from_pretrained(out)
    assert loaded.config.slots == cfg.slots and loaded.config.constant_value == 5.0
    loaded.config.num_frames, loaded.config.resolution, loaded.config.num_inference_steps = 2, 32, 2
    image = torch.zeros(32, 32, 4)
    image[8:24, 10:22] = 1.0
    assert torch.equal(ref(image, 15.0, seeds=[0]).frames, loaded(image, 15.0, seeds=[0]).frames)


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
