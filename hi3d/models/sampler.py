"""The one video-diffusion sampler both stages use (sgm's ``EulerEDMSampler`` as run by the Hi3D release).

- ``guided_denoiser``: the preconditioned UNet D(x; σ) with classifier-free guidance whose scale grows
  linearly over the frames (sgm ``LinearPredictionGuider``): D = D_u + s_f (D_c − D_u),
  s_f = min + f/(F−1)·(max − min); unconditional = zero CLIP embedding and zero concat, same ids.
- ``sample``: Euler steps of the probability-flow ODE over a σ schedule, with the start modes
  (``START_MODES``):

  * ``"noise"``: x = ε₀·√(1 + σ₀²) (release stage 1, ``pipeline_i2v_eval_v01.py``);
  * ``"release_blend"``: as ``"noise"``, and before every step i the sample is pulled towards the
    noised initial latents z: x ← x(1 − α_i) + (z + σ_i ε₀) α_i, α_i = (½(1 + cos(i/n)))^p, p = 40
    (release stage 2, ``pipeline_i2v_eval_v02.py``);
  * ``"sdedit"``: start at step k = round((1 − strength)·n) from z + σ_k ε₀, no blending (hi3d's
    alternative).
- ``video_generators`` / ``batch_randn``: one ``torch.Generator`` per video (video b's noise depends on
  its generator only), or one generator for the whole batch.

Latents are ``[B, F, C, h, w]``; σ are Python floats (the schedule is float64, ``edm.karras_sigmas``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from hi3d.errors import ConfigError, Hi3DError
from hi3d.models import edm
from hi3d.models.svd import randn, unet_forward

START_MODES = ("noise", "release_blend", "sdedit")
RELEASE_BLEND_POWER = 40.0

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
"""D(x; σ): noisy latents ``[B, F, C, h, w]`` and σ -> estimate of the clean latents, same shape."""


def video_generators(generator: torch.Generator | Sequence[torch.Generator] | None,
                     batch: int) -> list[torch.Generator | None]:
    """``batch`` generators: the given list (one per video), or the single generator repeated."""
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * batch
    if len(gens) != batch:
        raise Hi3DError(f"{len(gens)} generators for {batch} videos")
    return gens


def per_video(generators: Sequence[torch.Generator | None]) -> bool:
    """True when there are several generators, all distinct objects: then each video draws from its own."""
    return len(generators) > 1 and len(set(map(id, generators))) == len(generators)


def batch_randn(generators: Sequence[torch.Generator | None], shape: Sequence[int], device) -> torch.Tensor:
    """Standard normal ``[B, *shape]`` float32 on ``device``: video b from ``generators[b]`` when the B
    generators are distinct objects, else one draw for the batch from ``generators[0]``."""
    B = len(generators)
    if per_video(generators):
        return torch.cat([randn((1, *shape), g, device) for g in generators])
    return randn((B, *shape), generators[0], device)


def frame_guidance_scale(num_frames: int, min_scale: float, max_scale: float, device=None) -> torch.Tensor:
    """Per-frame guidance scale ``[1, F, 1, 1, 1]``, linear from ``min_scale`` (frame 0) to ``max_scale``."""
    return torch.linspace(min_scale, max_scale, num_frames, device=device).view(1, num_frames, 1, 1, 1)


def guided_denoiser(unet, concat: torch.Tensor, clip: torch.Tensor, ids: torch.Tensor, min_guidance: float,
                    max_guidance: float, sequential: bool = False) -> Denoiser:
    """D(x; σ) of ``unet`` with the conditions ``concat [B, F, C, h, w]`` (channel-appended), ``clip [B, 1, D]``
    (cross-attention), ``ids [B, S]`` and linear per-frame guidance. ``sequential``: the unconditional and
    conditional passes one after the other instead of one batch of 2B (less memory, same result). With both
    scales ≤ 1 no unconditional pass is made (a scale of exactly 1 gives D_c)."""
    B, Fr = concat.shape[:2]
    scale = frame_guidance_scale(Fr, min_guidance, max_guidance, concat.device)
    guided = min_guidance > 1.0 or max_guidance > 1.0
    zero_cat, zero_clip = torch.zeros_like(concat), torch.zeros_like(clip)

    def run(x, s, cat, emb, tid):
        return edm.denoise(lambda xi, c: unet_forward(unet, xi, c, cat, emb, tid), x, s)

    def denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
        s = torch.full((B,), sigma, device=x.device)
        if not guided:
            return run(x, s, concat, clip, ids)
        if sequential:
            d_u, d_c = run(x, s, zero_cat, zero_clip, ids), run(x, s, concat, clip, ids)
        else:
            d_u, d_c = run(torch.cat([x, x]), torch.cat([s, s]), torch.cat([zero_cat, concat]),
                           torch.cat([zero_clip, clip]), torch.cat([ids, ids])).chunk(2)
        return d_u + scale.to(x) * (d_c - d_u)

    return denoiser


def blend_weight(i: int, num_steps: int, power: float = RELEASE_BLEND_POWER) -> float:
    """Release stage-2 blend weight of step i: α_i = (½(1 + cos(i / n)))^power."""
    return (0.5 * (1.0 + math.cos(i / num_steps))) ** power


def sdedit_start(num_steps: int, strength: float) -> int:
    """First step of an SDEdit start: round((1 − strength)·n), at most n − 1."""
    if not 0 < strength <= 1:
        raise ConfigError(f"sdedit strength {strength} must be in (0, 1]")
    return min(num_steps - 1, round((1 - strength) * num_steps))


def check_start(start: str) -> None:
    if start not in START_MODES:
        raise ConfigError(f"sampler start '{start}' is not one of: {', '.join(START_MODES)}")


def sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: Sequence[float], start: str = "noise",
           init: torch.Tensor | None = None, strength: float = 1.0, blend_power: float = RELEASE_BLEND_POWER,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Euler EDM sampling. ``noise`` ε₀ ``[B, ...]`` standard normal (drawn once; "release_blend" reuses it at
    every step); ``sigmas`` ``[n + 1]`` descending with a trailing 0; ``init`` z ``[B, ...]`` the scaled clean
    latents to start from ("release_blend", "sdedit"). ``callback(i, x)`` after step i. Returns x at σ = 0."""
    check_start(start)
    sigmas = [float(s) for s in sigmas]
    n = len(sigmas) - 1
    if start != "noise" and init is None:
        raise Hi3DError(f"sampler start '{start}' needs initial latents")
    if start == "sdedit":
        first = sdedit_start(n, strength)
        x = init + sigmas[first] * noise
    else:
        first, x = 0, noise * edm.initial_noise_scale(sigmas[0])
    for i in range(first, n):
        if start == "release_blend":
            a = blend_weight(i, n, blend_power)
            x = x * (1 - a) + (init + sigmas[i] * noise) * a
        x = edm.euler_step(x, denoiser(x, sigmas[i]), sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(i, x)
    return x
