"""Stability generative-models (sgm) checkpoints -> our diffusers-format folders.

Table-driven: for every parameter of the target diffusers/transformers modules, ``RULES`` (regex on the
target key -> source key + tensor op) name the sgm key it comes from. A conversion fails with one clear
error listing target keys without a source; sgm keys that are neither used nor known to be unneeded
(``IGNORED``) are reported as left over.

sgm layout (``Stability-AI/generative-models``; Hi3D's release keeps it):
- ``model.diffusion_model.*``: ``VideoUNet`` (``input_blocks / middle_block / output_blocks``, resnets with
  ``in_layers/out_layers/emb_layers`` and ``time_stack`` temporal parts, ``SpatialVideoTransformer``
  attentions with ``time_stack`` temporal blocks, ``label_emb`` = added-time projection);
- ``first_stage_model.*``: the VAE, LDM ``Encoder`` (``down.i.block.j``, ``mid.block_1/attn_1/block_2``)
  and either SVD's ``VideoDecoder`` (``time_stack``, ``mix_factor``, ``conv_out.time_mix_conv``) or the
  plain image ``Decoder`` (Hi3D's released stage 1 uses SVD's image decoder) plus ``quant_conv``s;
- ``conditioner.embedders.0.open_clip.model.visual.*``: OpenCLIP ViT-H/14 image tower -> transformers
  ``CLIPVisionModelWithProjection``;
- stage 1: ``conditioner.embedders.1.aesthetic_model.visual.*`` (OpenAI CLIP ViT-L/14, same layout) -> a second
  ``CLIPVisionModelWithProjection`` and ``…aesthetic_mlp.*`` -> ``hi3d.models.aesthetic.AestheticMLP``;
- stage 2: ``conditioner.embedders.2.model.model.*`` (MiDaS DPT-Hybrid) -> transformers ``DPTForDepthEstimation``;
- known tensors that are not needed (``IGNORED``, each with its reason) are reported apart from leftovers.

The released files are DeepSpeed model states (``{'module': {'module.<key>': ...}}``, float16); the fixture
``release-keys/`` in the shared folder lists their every key and shape (tests convert it with no flag).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hi3d.errors import Hi3DError

UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.open_clip.model.visual."
AES_CLIP, AES_MLP = "conditioner.embedders.1.aesthetic_model.visual.", "conditioner.embedders.1.aesthetic_mlp."  # stage 1
DEPTH = "conditioner.embedders.2.model.model."  # stage 2: MiDaS DPT-Hybrid (vtdm DepthEmbedder -> MiDaSInference -> DPT)

# ---- tensor ops (sgm -> ours) --------------------------------------------------------------------------------
OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "copy": lambda t: t,
    "squeeze_1x1": lambda t: t.reshape(t.shape[0], -1) if t.ndim == 4 else t,
    "transpose": lambda t: t.t().contiguous(),
    "q": lambda t: t.chunk(3)[0].contiguous(),  # fused in_proj / qkv [3·D, ...] split in q, k, v order
    "k": lambda t: t.chunk(3)[1].contiguous(),
    "v": lambda t: t.chunk(3)[2].contiguous(),
}

# ---- leaf renames (ours -> sgm) -------------------------------------------------------------------------------
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_TEMPORAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _leaf(rest: str, table: dict[str, str]) -> str:
    for ours, theirs in table.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


@dataclass
class Layout:
    """Numbers the sgm indices depend on: resnets per UNet block, UNet blocks with attention, VAE levels."""
    unet_layers: int = 2
    unet_attn_blocks: tuple[bool, ...] = (True, True, True, False)  # down blocks with cross-attention
    vae_levels: int = 4


def _unet_resnet(prefix: str, part: str, rest: str) -> str:
    if part == "spatial_res_block":
        return f"{prefix}.{_leaf(rest, UNET_RESNET)}"
    if part == "temporal_res_block":
        return f"{prefix}.time_stack.{_leaf(rest, UNET_RESNET)}"
    return f"{prefix}.time_mixer.{rest}"


def _unet_attn(prefix: str, rest: str) -> str:
    rest = rest.replace("temporal_transformer_blocks.", "time_stack.")
    rest = rest.replace("time_pos_embed.linear_1", "time_pos_embed.0").replace("time_pos_embed.linear_2", "time_pos_embed.2")
    return f"{prefix}.{rest}"


def _unet_rules(lay: Layout) -> list[tuple[str, Callable[..., str]]]:
    L = lay.unet_layers
    up_attn = lay.unet_attn_blocks[::-1]
    return [
        (r"conv_in\.(.*)", lambda r: f"input_blocks.0.0.{r}"),
        (r"time_embedding\.linear_([12])\.(.*)", lambda i, r: f"time_embed.{2 * int(i) - 2}.{r}"),
        (r"add_embedding\.linear_([12])\.(.*)", lambda i, r: f"label_emb.0.{2 * int(i) - 2}.{r}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(spatial_res_block|temporal_res_block|time_mixer)\.(.*)",
         lambda b, l, part, r: _unet_resnet(f"input_blocks.{1 + int(b) * (L + 1) + int(l)}.0", part, r)),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda b, l, r: _unet_attn(f"input_blocks.{1 + int(b) * (L + 1) + int(l)}.1", r)),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", lambda b, r: f"input_blocks.{(int(b) + 1) * (L + 1)}.0.op.{r}"),
        (r"mid_block\.resnets\.(\d+)\.(spatial_res_block|temporal_res_block|time_mixer)\.(.*)",
         lambda i, part, r: _unet_resnet(f"middle_block.{2 * int(i)}", part, r)),
        (r"mid_block\.attentions\.0\.(.*)", lambda r: _unet_attn("middle_block.1", r)),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(spatial_res_block|temporal_res_block|time_mixer)\.(.*)",
         lambda b, l, part, r: _unet_resnet(f"output_blocks.{int(b) * (L + 1) + int(l)}.0", part, r)),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
         lambda b, l, r: _unet_attn(f"output_blocks.{int(b) * (L + 1) + int(l)}.1", r)),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)",
         lambda b, r: f"output_blocks.{int(b) * (L + 1) + L}.{2 if up_attn[int(b)] else 1}.conv.{r}"),
        (r"conv_norm_out\.(.*)", lambda r: f"out.0.{r}"),
        (r"conv_out\.(.*)", lambda r: f"out.2.{r}"),
    ]


def _vae_resnet(prefix: str, rest: str) -> str:
    """VAE resnet (plain ``ResnetBlock2D`` or ``SpatioTemporalResBlock``) -> sgm (``ResnetBlock``/``VideoResBlock``)."""
    if rest.startswith("spatial_res_block."):
        rest = rest[len("spatial_res_block."):]
    elif rest.startswith("temporal_res_block."):
        return f"{prefix}.time_stack.{_leaf(rest[len('temporal_res_block.'):], VAE_TEMPORAL)}"
    elif rest.startswith("time_mixer."):
        return f"{prefix}.{rest[len('time_mixer.'):]}"
    return f"{prefix}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"


def _vae_rules(lay: Layout) -> list[tuple[str, Callable[..., str]]]:
    n = lay.vae_levels
    return [
        (r"(encoder|decoder)\.conv_in\.(.*)", lambda e, r: f"{e}.conv_in.{r}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", lambda i, j, r: _vae_resnet(f"encoder.down.{i}.block.{j}", r)),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", lambda i, r: f"encoder.down.{i}.downsample.conv.{r}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda i, j, r: _vae_resnet(f"decoder.up.{n - 1 - int(i)}.block.{j}", r)),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", lambda i, r: f"decoder.up.{n - 1 - int(i)}.upsample.conv.{r}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)",
         lambda e, i, r: _vae_resnet(f"{e}.mid.block_{int(i) + 1}", r)),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", lambda e, r: f"{e}.mid.attn_1.{_leaf(r, VAE_ATTN)}"),
        (r"(encoder|decoder)\.conv_norm_out\.(.*)", lambda e, r: f"{e}.norm_out.{r}"),
        (r"decoder\.time_conv_out\.(.*)", lambda r: f"decoder.conv_out.time_mix_conv.{r}"),
        (r"(encoder|decoder)\.conv_out\.(.*)", lambda e, r: f"{e}.conv_out.{r}"),
        (r"(quant_conv|post_quant_conv)\.(.*)", lambda q, r: f"{q}.{r}"),
    ]


def _clip_rules() -> list[tuple[str, Callable[..., str]]]:
    enc = r"vision_model\.encoder\.layers\.(\d+)\."
    mlp = {"fc1": "c_fc", "fc2": "c_proj"}
    return [
        (r"vision_model\.embeddings\.class_embedding", lambda: "class_embedding"),
        (r"vision_model\.embeddings\.position_embedding\.weight", lambda: "positional_embedding"),
        (r"vision_model\.embeddings\.patch_embedding\.weight", lambda: "conv1.weight"),
        (r"vision_model\.pre_layrnorm\.(.*)", lambda r: f"ln_pre.{r}"),
        (r"vision_model\.post_layernorm\.(.*)", lambda r: f"ln_post.{r}"),
        (enc + r"layer_norm([12])\.(.*)", lambda i, j, r: f"transformer.resblocks.{i}.ln_{j}.{r}"),
        (enc + r"self_attn\.([qkv])_proj\.(weight|bias)",
         lambda i, p, w: f"transformer.resblocks.{i}.attn.in_proj_{w}"),
        (enc + r"self_attn\.out_proj\.(.*)", lambda i, r: f"transformer.resblocks.{i}.attn.out_proj.{r}"),
        (enc + r"mlp\.(fc[12])\.(.*)", lambda i, f, r: f"transformer.resblocks.{i}.mlp.{mlp[f]}.{r}"),
        (r"visual_projection\.weight", lambda: "proj"),
    ]


def _dpt_rules() -> list[tuple[str, Callable[..., str]]]:
    """transformers ``DPTForDepthEstimation`` (hybrid) -> MiDaS ``DPTDepthModel`` (``pretrained.model`` = timm
    ``vit_base_resnet50_384``, ``pretrained.act_postprocessN`` readout/resize, ``scratch`` = neck and head)."""
    vit, bit = r"dpt\.encoder\.layer\.(\d+)\.", r"dpt\.embeddings\.backbone\.bit\."
    leaf = {"attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
            "layernorm_before": "norm1", "layernorm_after": "norm2"}
    return [
        (r"dpt\.embeddings\.cls_token", lambda: "pretrained.model.cls_token"),
        (r"dpt\.embeddings\.position_embeddings", lambda: "pretrained.model.pos_embed"),
        (bit + r"embedder\.convolution\.(.*)", lambda r: f"pretrained.model.patch_embed.backbone.stem.conv.{r}"),
        (bit + r"embedder\.norm\.(.*)", lambda r: f"pretrained.model.patch_embed.backbone.stem.norm.{r}"),
        (bit + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)",
         lambda s, b, r: f"pretrained.model.patch_embed.backbone.stages.{s}.blocks.{b}.{r}"),
        (r"dpt\.embeddings\.projection\.(.*)", lambda r: f"pretrained.model.patch_embed.proj.{r}"),
        (vit + r"attention\.attention\.(query|key|value)\.(weight|bias)",
         lambda i, p, w: f"pretrained.model.blocks.{i}.attn.qkv.{w}"),
        (vit + r"(.*)", lambda i, r: f"pretrained.model.blocks.{i}.{_leaf(r, leaf)}"),
        (r"dpt\.layernorm\.(.*)", lambda r: f"pretrained.model.norm.{r}"),
        (r"neck\.reassemble_stage\.readout_projects\.(\d)\.0\.(.*)",
         lambda i, r: f"pretrained.act_postprocess{int(i) + 1}.0.project.0.{r}"),
        (r"neck\.reassemble_stage\.layers\.(\d)\.(projection|resize)\.(.*)",
         lambda i, p, r: f"pretrained.act_postprocess{int(i) + 1}.{3 if p == 'projection' else 4}.{r}"),
        (r"neck\.convs\.(\d)\.(.*)", lambda i, r: f"scratch.layer{int(i) + 1}_rn.{r}"),
        (r"neck\.fusion_stage\.layers\.(\d)\.projection\.(.*)", lambda i, r: f"scratch.refinenet{4 - int(i)}.out_conv.{r}"),
        (r"neck\.fusion_stage\.layers\.(\d)\.residual_layer([12])\.convolution([12])\.(.*)",
         lambda i, u, c, r: f"scratch.refinenet{4 - int(i)}.resConfUnit{u}.conv{c}.{r}"),
        (r"head\.head\.(\d)\.(.*)", lambda i, r: f"scratch.output_conv.{i}.{r}"),
    ]


QKV = {"q": "q", "k": "k", "v": "v", "query": "q", "key": "k", "value": "v"}


def _op(module: str, key: str, source: str) -> str:
    m = re.search(r"(?:self_attn\.([qkv])_proj|attention\.attention\.(query|key|value))\.", key)
    if m:
        return QKV[m.group(1) or m.group(2)]
    if module in ("image_encoder", "aesthetic_clip") and key == "visual_projection.weight":
        return "transpose"
    if module == "vae" and ".attn_1." in source and source.endswith(".weight") and not source.endswith("norm.weight"):
        return "squeeze_1x1"
    return "copy"


PREFIXES = {"unet": UNET, "vae": VAE, "image_encoder": CLIP, "aesthetic_clip": AES_CLIP, "aesthetic_mlp": AES_MLP,
            "depth": DEPTH}
RULES = {"unet": _unet_rules, "vae": _vae_rules, "image_encoder": lambda lay: _clip_rules(),
         "aesthetic_clip": lambda lay: _clip_rules(), "aesthetic_mlp": lambda lay: [(r"(layers\.\d\..*)", lambda r: r)],
         "depth": lambda lay: _dpt_rules()}

# sgm keys that are known and deliberately not converted: (regex on the full key, why)
IGNORED: list[tuple[str, str]] = [
    (r"conditioner\.embedders\.\d+\.open_clip\.model\.(?!visual\.)",
     "text side of the OpenCLIP ViT-H/14 (ln_final, token_embedding, ...): the image embedder never uses it"),
    (r"conditioner\.embedders\.\d+\.aesthetic_model\.(?!visual\.)",
     "text side of the aesthetic CLIP ViT-L/14 (AesEmbedder deletes only its transformer): encode_image never uses it"),
    (r"conditioner\.embedders\.\d+\.encoder\.",
     "condition-VAE copy that encodes the concat latent: the same tensors as first_stage_model (checked when real)"),
    (r"conditioner\.embedders\.\d+\.model\.model\.pretrained\.model\.head\.",
     "ImageNet classifier of MiDaS's timm ViT: the depth model never uses it"),
    (r"first_stage_model\.loss\.|denoiser\.|sampler\.|loss_fn\.", "training-only objects"),
]
EMA_UNUSED = "EMA copies (model_ema.*): not converted without --ema"
RAW_REPLACED = "raw UNet weights: --ema converts their model_ema.* copies instead"


def key_map(modules: dict[str, torch.nn.Module], layout: Layout) -> dict[str, tuple[str, str]]:
    """``{"unet.<key>": (sgm key, op)}`` for every parameter/buffer of ``modules`` (keys of ``PREFIXES``: ``unet``,
    ``vae``, ``image_encoder``, ``aesthetic_clip``, ``aesthetic_mlp``, ``depth``). Raises ``Hi3DError`` naming any
    target key that no rule covers."""
    out, unmatched = {}, []
    for name, module in modules.items():
        rules = RULES[name](layout)
        for key in module.state_dict():
            if key.endswith("position_ids"):  # transformers buffer, not a weight
                continue
            for pattern, fn in rules:
                m = re.fullmatch(pattern, key)
                if m:
                    src = PREFIXES[name] + fn(*m.groups())
                    out[f"{name}.{key}"] = (src, _op(name, key, src))
                    break
            else:
                unmatched.append(f"{name}.{key}")
    if unmatched:
        raise Hi3DError(f"no conversion rule for {len(unmatched)} keys, e.g. {unmatched[:5]}")
    return out


def layout_of(unet, vae) -> Layout:
    return Layout(unet_layers=unet.config.layers_per_block if isinstance(unet.config.layers_per_block, int)
                  else unet.config.layers_per_block[0],
                  unet_attn_blocks=tuple("CrossAttn" in t for t in unet.config.down_block_types),
                  vae_levels=len(vae.config.block_out_channels))


def ema_key(key: str) -> str:
    """sgm ``LitEma`` name of a ``model.diffusion_model.*`` parameter: ``model_ema.`` + name without dots."""
    return "model_ema." + key[len("model."):].replace(".", "")


@dataclass
class ConversionReport:
    mapped: int
    leftover: list[str]
    ignored: dict[str, str]  # checkpoint key -> why it was not converted
    filled: list[str]  # targets set to a default because the checkpoint has no such tensor (quant convs)


def _check_vae_copy(sd: dict[str, torch.Tensor]) -> None:
    """The conditioner's VAE copy is ignored as a duplicate of ``first_stage_model``: make sure it is one."""
    for k, v in sd.items():
        m = re.match(r"conditioner\.embedders\.\d+\.encoder\.(.*)", k)
        ref = sd.get(VAE + m.group(1)) if m else None
        if ref is not None and not v.is_meta and not ref.is_meta and not torch.equal(v, ref):
            raise Hi3DError(f"{k} differs from {VAE + m.group(1)}: the condition VAE is not a copy of the first stage, "
                            "which hi3d assumes (one VAE)")


def convert_state_dict(sd: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], use_ema: bool = False,
                       layout: Layout | None = None) -> ConversionReport:
    """Load the sgm state dict ``sd`` into ``modules`` (in place, strict shapes; meta tensors allowed). Returns
    what was mapped, ignored (with why) and left over. ``use_ema``: the UNet from ``model_ema.*`` (a one-line error
    when the checkpoint has none; the raw UNet keys are then ignored). The VAE's ``quant_conv`` comes from
    ``first_stage_model.quant_conv`` if present, else from the concat-latent encoder copy in the conditioner, else
    identity (SVD's first stage has none)."""
    layout = layout or layout_of(modules["unet"], modules["vae"])
    kmap = key_map(modules, layout)
    if use_ema and not any(k.startswith("model_ema.") for k in sd):
        raise Hi3DError("--ema: the checkpoint holds no EMA weights (no 'model_ema.*' keys; the released Hi3D "
                        "checkpoints have none) — convert without --ema")
    _check_vae_copy(sd)
    used, missing, filled = set(), [], []
    targets: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    for target, (src, op) in kmap.items():
        name, key = target.split(".", 1)
        if use_ema and src.startswith(UNET):
            src = ema_key(src)
        if src not in sd and key.split(".")[0] in ("quant_conv", "post_quant_conv"):
            alt = [k for k in sd if re.fullmatch(rf"conditioner\.embedders\.\d+\.encoder\.{re.escape(key)}", k)]
            if alt:
                src = alt[0]
            else:
                p = dict(modules[name].named_parameters())[key]
                targets[name][key] = (torch.eye(p.shape[0]).reshape(p.shape) if key.endswith("weight")
                                      else torch.zeros(p.shape))
                filled.append(target)
                continue
        if src not in sd:
            missing.append(f"{target} <- {src}")
            continue
        used.add(src)
        targets[name][key] = OPS[op](sd[src])
    if missing:
        raise Hi3DError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:4]} — is it a "
                        "generative-models checkpoint of this stage, matching the configs?")
    for name, module in modules.items():
        try:
            module.load_state_dict(targets[name], strict=False, assign=True)
        except RuntimeError as e:
            raise Hi3DError(f"checkpoint does not fit the {name} config: {str(e).splitlines()[1:3]}") from None
    ignored, leftover = {}, []
    for k in sd:
        if k in used:
            continue
        why = next((w for p, w in IGNORED if re.match(p, k)), None)
        if why is None and k.startswith("model_ema."):
            why = EMA_UNUSED if not use_ema else "EMA bookkeeping (decay, num_updates)"
        if why is None and use_ema and k.startswith(UNET):
            why = RAW_REPLACED
        if why is None:
            leftover.append(k)
        else:
            ignored[k] = why
    return ConversionReport(len(used), sorted(leftover), ignored, filled)


def unwrap_state_dict(raw) -> dict[str, torch.Tensor]:
    """A loaded checkpoint -> flat ``{key: tensor}``: DeepSpeed model states (``{'module': {'module.<key>': ...},
    ...bookkeeping}``, the release's container), Lightning (``state_dict``) or a plain state dict."""
    for k in ("state_dict", "module"):
        if isinstance(raw, dict) and k in raw and isinstance(raw[k], dict):
            raw = raw[k]
    if not isinstance(raw, dict):
        raise Hi3DError(f"checkpoint holds a {type(raw).__name__}, not a state dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()
            if isinstance(v, torch.Tensor)}


def read_checkpoint(path: str | Path, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """``.safetensors``, Lightning ``.ckpt`` (``state_dict``) or DeepSpeed ``.pt`` (``module``, ``module.``
    prefixes, as Hi3D's release) -> flat state dict (stored dtype kept: float16 for the release)."""
    path = Path(path)
    if not path.is_file():
        raise Hi3DError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as e:  # pickle with non-tensor objects
        raise Hi3DError(f"cannot read {path} with weights_only=True ({str(e).splitlines()[0][:120]}); if you trust "
                        "the file, re-run with --unsafe-pickle") from None
    return unwrap_state_dict(raw)

def read_config(path: Path) -> dict:
    """A JSON config without its ``_comment``-style keys."""
    return {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}


def build_modules(config_dir: str | Path, vae_kind: str, meta: bool = True, aesthetic: bool = False,
                  unet_config: str | Path | None = None) -> dict[str, torch.nn.Module]:
    """Empty (meta-device) UNet, VAE and CLIP from ``unet.json`` (or ``unet_config``), ``vae.json`` (or
    ``vae_image_decoder.json`` when ``vae_kind == "image"``) and ``image_encoder.json`` in ``config_dir``; with
    ``aesthetic`` also the aesthetic scorer's CLIP (``aesthetic_clip.json``) and MLP."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from hi3d.models.aesthetic import AestheticMLP

    d = Path(config_dir)
    ctx = init_empty_weights() if meta else torch.device("cpu")
    with ctx:
        unet = UNetSpatioTemporalConditionModel.from_config(read_config(unet_config or d / "unet.json"))
        vae = (AutoencoderKL.from_config(read_config(d / "vae_image_decoder.json")) if vae_kind == "image"
               else AutoencoderKLTemporalDecoder.from_config(read_config(d / "vae.json")))
        out = {"unet": unet, "vae": vae,
               "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**read_config(d / "image_encoder.json")))}
        if aesthetic:
            aes = CLIPVisionConfig(**read_config(d / "aesthetic_clip.json"))
            out.update(aesthetic_clip=CLIPVisionModelWithProjection(aes), aesthetic_mlp=AestheticMLP(aes.projection_dim))
    return out


def vae_kind_of(sd: dict[str, torch.Tensor]) -> str:
    """``"video"`` when the first stage has SVD's temporal decoder, else ``"image"``."""
    return "video" if any(k.startswith(VAE + "decoder.") and ".time_stack." in k for k in sd) else "image"


def default_config_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "stage1"


def check_sgm(sd: dict[str, torch.Tensor], checkpoint) -> None:
    if not any(k.startswith(UNET) for k in sd):
        raise Hi3DError(f"{checkpoint}: no '{UNET}*' keys — not a generative-models (sgm) diffusion checkpoint")


def check_leftover(report: ConversionReport, allow_leftover: bool, where: str) -> None:
    if report.leftover and not allow_leftover:
        raise Hi3DError(f"{len(report.leftover)} checkpoint tensors were not converted, e.g. {report.leftover[:5]}; "
                        f"check the configs in {where} or pass --allow-leftover")


def convert_stage1_modules(sd: dict[str, torch.Tensor], config_dir: str | Path | None = None, use_ema: bool = False,
                           allow_leftover: bool = False, checkpoint="checkpoint"):
    """Stage-1 sgm state dict -> (modules, report): UNet, VAE, image encoder and, when the checkpoint carries
    the release's aesthetic embedder (``AES_CLIP``), its CLIP and MLP. Meta tensors give meta modules."""
    config_dir = Path(config_dir or default_config_dir())
    check_sgm(sd, checkpoint)
    modules = build_modules(config_dir, vae_kind_of(sd), aesthetic=any(k.startswith(AES_CLIP) for k in sd))
    report = convert_state_dict(sd, modules, use_ema=use_ema)
    check_leftover(report, allow_leftover, str(config_dir))
    return modules, report


def convert_stage1(checkpoint: str | Path, out: str | Path, config_dir: str | Path | None = None,
                   use_ema: bool = False, unsafe_pickle: bool = False, allow_leftover: bool = False,
                   sd: dict[str, torch.Tensor] | None = None, aesthetic_score: float = 5.0):
    """Official Hi3D stage-1 checkpoint -> ``OrbitPipeline`` folder ``out`` (unet/ vae/ image_encoder/
    feature_extractor/ [aesthetic/] hi3d_pipeline.json). ``sd`` may be given directly (tests)."""
    from transformers import CLIPImageProcessor

    from hi3d.models.aesthetic import AestheticScorer
    from hi3d.models.stage1 import Stage1Components, Stage1Config
    from hi3d.models.svd import save_stage_folder

    config_dir = Path(config_dir or default_config_dir())
    sd = read_checkpoint(checkpoint, unsafe_pickle) if sd is None else sd
    modules, report = convert_stage1_modules(sd, config_dir, use_ema, allow_leftover, checkpoint)
    fe_path = config_dir / "feature_extractor.json"
    fe_cfg = read_config(fe_path) if fe_path.is_file() else {}
    unet = modules["unet"]
    # the release's first slot: the aesthetic score of each input (aesthetic/); aesthetic_score when fixed or absent
    cfg = Stage1Config(num_frames=unet.config.num_frames, resolution=8 * (unet.config.sample_size or 64),
                       slots=["aesthetic", "elevation", "noise_aug"], constant_value=aesthetic_score)
    aesthetic = (AestheticScorer(modules["aesthetic_clip"].eval(), modules["aesthetic_mlp"].eval())
                 if "aesthetic_clip" in modules else None)
    components = Stage1Components(unet, modules["vae"], modules["image_encoder"].eval(), CLIPImageProcessor(**fe_cfg),
                                  aesthetic)
    save_stage_folder(out, vars(components), cfg)
    return report


def print_report(report: ConversionReport, out) -> None:
    print(f"converted {report.mapped} tensors ({len(report.ignored)} known-unneeded ignored, {len(report.leftover)} "
          f"left over, defaults for {report.filled or 'none'}) -> {out}")


def report_entry(report: ConversionReport) -> dict:
    """run.json summary: counts per ignore reason, not every key."""
    reasons: dict[str, int] = {}
    for why in report.ignored.values():
        reasons[why] = reasons.get(why, 0) + 1
    return {"mapped": report.mapped, "ignored": reasons, "leftover": report.leftover, "filled": report.filled}


def cli(argv: list[str] | None = None) -> int:
    import argparse

    from hi3d.provenance import RunRecord

    ap = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="official stage-1 checkpoint (.pt DeepSpeed, .ckpt or .safetensors)")
    ap.add_argument("--out", required=True, help="output folder (diffusers format, loadable by OrbitPipeline)")
    ap.add_argument("--config-dir", default=None, help="folder with unet.json, vae*.json, image_encoder.json "
                    "(default configs/stage1)")
    ap.add_argument("--ema", action="store_true", help="convert the UNet's EMA weights (model_ema.*; an error when "
                    "the checkpoint has none, as the released ones)")
    ap.add_argument("--unsafe-pickle", action="store_true", help="allow full pickle loading (trusted files only)")
    ap.add_argument("--allow-leftover", action="store_true", help="do not fail on unconverted tensors")
    ap.add_argument("--aesthetic-score", type=float, default=5.0, help="fixed value of the release's aesthetic slot, "
                    "used with aesthetic=fixed or when the checkpoint has no aesthetic scorer (stored as constant_value "
                    "in hi3d_pipeline.json); by default each input is scored by the converted aesthetic/ predictor")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rec = RunRecord(out, "convert_checkpoint", config=vars(args), seed=None, device=torch.device("cpu"))
    with rec.stage("convert") as entry:
        report = convert_stage1(args.checkpoint, out, args.config_dir, args.ema, args.unsafe_pickle,
                                args.allow_leftover, aesthetic_score=args.aesthetic_score)
        entry.update(report_entry(report))
    rec.add_weights(out)  # run.json is rewritten after save_pretrained swapped the folder in
    rec.finish()
    print_report(report, out)
    return 0
