"""``added_time_ids`` slot layouts and UNet input adaptation shared by both diffusion stages.

The UNet (diffusers ``UNetSpatioTemporalConditionModel``) embeds each id of ``added_time_ids [B, S]``
sinusoidally into ``addition_time_embed_dim`` (256) features (``add_time_proj``), concatenates them
(``projection_class_embeddings_input_dim = 256·S``) and adds ``add_embedding(·)`` to the timestep
embedding. We only choose which scalar goes in which slot:

- ``"constant"``: a fixed value (``constant_value``) for every sample,
- ``"elevation"``: camera elevation in degrees (batch key ``elevation``),
- ``"noise_aug"``: noise-augmentation strength of the conditioning image,
- SVD's own ``"fps"`` and ``"motion_bucket"`` (values from ``SVD_DEFAULTS``) for compatibility,
- ``"aesthetic"``: the released Hi3D stage-1 checkpoint's first slot, an aesthetic score ``a`` (value
  ``constant_value``; the release computed it per input with the LAION aesthetic predictor) embedded
  as ``[a, sgm_timestep_embedding(100·a, 255)]`` — installed by ``install_slot_projection``.

Layouts: stage 1 (released Hi3D) ``["constant", "elevation", "noise_aug"]`` -> 768;
stage 2 ``["elevation", "noise_aug"]`` -> 512; SVD itself ``["fps", "motion_bucket", "noise_aug"]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hi3d.errors import ConfigError

SLOT_DIM = 256
SVD_SLOTS = ("fps", "motion_bucket", "noise_aug")
SVD_DEFAULTS = {"fps": 6.0, "motion_bucket": 127.0}  # SVD conditions on fps − 1 (7 fps -> 6)
KNOWN_SLOTS = ("constant", "elevation", "noise_aug", "fps", "motion_bucket", "aesthetic")


def check_slots(slots: Sequence[str]) -> None:
    unknown = [s for s in slots if s not in KNOWN_SLOTS]
    if unknown or len(set(slots)) != len(slots) or not slots:
        raise ConfigError(f"added_time_ids slots {list(slots)}: each must be one of {list(KNOWN_SLOTS)}, "
                          "listed once")


def projection_input_dim(slots: Sequence[str], slot_dim: int = SLOT_DIM) -> int:
    """Input width of the UNet's ``add_embedding``: ``slot_dim · len(slots)``."""
    return slot_dim * len(slots)


def added_time_ids(slots: Sequence[str], elevation: torch.Tensor, noise_aug: torch.Tensor,
                   constant_value: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Ids ``[B, len(slots)]`` in slot order from ``elevation [B]`` (degrees), ``noise_aug [B]`` and the
    ``"constant"``/``"aesthetic"`` value (a float or per-video ``[B]``)."""
    check_slots(slots)
    elevation = elevation.float()
    noise_aug = noise_aug.to(elevation).expand_as(elevation)
    constant = torch.as_tensor(constant_value).to(elevation).expand_as(elevation)
    values = {"elevation": elevation, "noise_aug": noise_aug, "constant": constant, "aesthetic": constant,
              **{k: torch.full_like(elevation, v) for k, v in SVD_DEFAULTS.items()}}
    return torch.stack([values[s] for s in slots], dim=1)


def sgm_timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """generative-models' sinusoid: ``[cos(t·f_i), sin(t·f_i)]`` (+ a zero column if ``dim`` is odd),
    f_i = max_period^(−i/⌊dim/2⌋). ``t [N]`` -> ``[N, dim]`` float32. (diffusers' ``Timesteps(dim, True, 0)`` equals
    it for even ``dim``.)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], -1) if dim % 2 else emb


class SlotTimeProjection(torch.nn.Module):
    """Drop-in for the UNet's ``add_time_proj``: flattened ids ``[B·S]`` -> ``[B·S, dim]``, each slot embedded
    like diffusers' ``Timesteps(dim, True, 0)`` except ``"aesthetic"`` slots: ``[a, sgm_embedding(100·a, dim − 1)]``."""

    def __init__(self, slots: Sequence[str], dim: int = SLOT_DIM):
        super().__init__()
        self.slots, self.dim = list(slots), dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1, len(self.slots))
        out = []
        for j, slot in enumerate(self.slots):
            v = ids[:, j].float()
            out.append(torch.cat([v[:, None], sgm_timestep_embedding(100.0 * v, self.dim - 1)], -1)
                       if slot == "aesthetic" else sgm_timestep_embedding(v, self.dim))
        return torch.stack(out, 1).flatten(0, 1)


def install_slot_projection(unet, slots: Sequence[str]) -> None:
    """Give ``unet`` the slot embedding ``slots`` need (only ``"aesthetic"`` differs from diffusers' default)."""
    if "aesthetic" in slots:
        unet.add_time_proj = SlotTimeProjection(slots, unet.config.addition_time_embed_dim)


def adapt_added_time_projection(unet, source_slots: Sequence[str], target_slots: Sequence[str],
                                mode: str = "keep") -> None:
    """Re-create ``unet.add_embedding.linear_1`` for ``target_slots`` (in place, config updated).

    ``mode="by_name"``: columns of slots present in both layouts are copied from the source weights (e.g.
    SVD's noise-aug slot); new slots get zero columns, so at initialisation they do not change the output.
    ``mode="keep"`` (default): as ``by_name``, except that a layout of the source's size keeps all weights
    position by position (the released Hi3D recipe loads SVD's 768-wide projection for its three slots and
    fine-tunes it).
    """
    if mode not in ("keep", "by_name"):
        raise ConfigError(f"time_ids_init must be 'keep' or 'by_name', not '{mode}'")
    check_slots(target_slots)
    old = unet.add_embedding.linear_1
    d = unet.config.addition_time_embed_dim
    if old.in_features != d * len(source_slots):
        raise ConfigError(f"UNet add_embedding takes {old.in_features} features, not {d}·{len(source_slots)} "
                          f"for slots {list(source_slots)}")
    if list(target_slots) == list(source_slots) or (mode == "keep" and len(target_slots) == len(source_slots)):
        unet.register_to_config(projection_class_embeddings_input_dim=d * len(target_slots))
        return
    new = torch.nn.Linear(d * len(target_slots), old.out_features, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.copy_(old.bias)
        for j, slot in enumerate(target_slots):
            if slot in source_slots:
                i = list(source_slots).index(slot)
                new.weight[:, j * d:(j + 1) * d] = old.weight[:, i * d:(i + 1) * d]
    unet.add_embedding.linear_1 = new
    unet.register_to_config(projection_class_embeddings_input_dim=d * len(target_slots))


def widen_conv_in(unet, in_channels: int, old_positions: Sequence[int] | None = None) -> None:
    """Widen ``unet.conv_in`` to ``in_channels`` inputs (in place, config updated).

    Old input channel ``i`` moves to new channel ``old_positions[i]`` (default: the first ones) with its
    weights; the other columns are zero, so at init the output equals the original's when the old
    inputs sit at those positions. E.g. stage 2: noisy 0–3, depth 4–12, frame latents 13–16 ->
    ``old_positions = [0, 1, 2, 3, 13, 14, 15, 16]``.
    """
    old = unet.conv_in
    old_positions = list(range(old.in_channels)) if old_positions is None else list(old_positions)
    if len(old_positions) != old.in_channels or max(old_positions) >= in_channels:
        raise ConfigError(f"old_positions {old_positions} must place {old.in_channels} channels in {in_channels}")
    if in_channels < old.in_channels:
        raise ConfigError(f"cannot narrow conv_in from {old.in_channels} to {in_channels} channels")
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                          device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, old_positions] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
