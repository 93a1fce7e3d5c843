"""EDM (Karras et al. 2022) as used by Stable Video Diffusion and Hi3D: v-prediction preconditioning,
log-normal σ sampling, loss weighting, conditioning noise augmentation, condition dropout, Karras σ
schedule and the Euler sampler step.

Shapes: ``σ`` is ``[B]`` (one σ per video) unless stated; latents are ``[B, F, C, h, w]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` with ``ndim`` dimensions in total."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def precondition(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD's v-prediction EDM scalings (sgm ``VScalingWithEDMcNoise``), elementwise in ``σ``:

    c_skip = 1 / (σ² + 1),  c_out = −σ / √(σ² + 1),  c_in = 1 / √(σ² + 1),  c_noise = ¼ ln σ.
    """
    s2 = sigma ** 2 + 1.0
    return 1.0 / s2, -sigma / s2.sqrt(), 1.0 / s2.sqrt(), 0.25 * sigma.log()


def denoise(unet_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
            sigma: torch.Tensor) -> torch.Tensor:
    """Preconditioned denoiser D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise).

    ``unet_fn(scaled_x, c_noise)`` is the raw network F (conditions bound by the caller), ``x`` the noisy
    latents ``[B, ...]``, ``σ`` ``[B]``. Returns the estimate of the clean latents, same shape as ``x``.
    """
    c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) if i < 3 else c
                                    for i, c in enumerate(precondition(sigma)))
    return c_skip * x + c_out * unet_fn(c_in * x, c_noise)


def sample_sigma(batch: int, P_mean: float = 1.0, P_std: float = 1.6, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Training noise levels, one per video: ln σ ~ N(P_mean, P_std²). Returns ``[batch]``."""
    z = torch.randn(batch, generator=generator, device=device)
    return (P_mean + P_std * z).exp()


def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """EDM weighting for v-prediction (sgm ``VWeighting``): λ(σ) = (σ² + 1) / σ²."""
    return (sigma ** 2 + 1.0) / sigma ** 2


def noise_aug_strength(batch: int, generator: torch.Generator | None = None, mean: float = -3.0, std: float = 0.5,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise-augmentation strength of the conditioning image in training: exp(N(mean, std²)), ``[batch]``."""
    z = torch.randn(batch, generator=generator, device=device)
    return (mean + std * z).exp()


def condition_dropout(batch: int, p: float = 0.1, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep-mask for classifier-free guidance training: 1 with probability 1 − p, 0 with p. ``[batch]`` float."""
    u = torch.rand(batch, generator=generator, device=device)
    return (u >= p).float()


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0) -> torch.Tensor:
    """Karras schedule, ``[n + 1]`` float64 with a trailing 0:

    σ_i = (σ_max^(1/ρ) + i/(n−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,  i = 0 … n−1;  σ_n = 0.
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def initial_noise_scale(sigma_max: float) -> float:
    """Scale of the starting noise, √(1 + σ_max²) (sgm's sampler: x_T = ε·√(1 + σ_0²))."""
    return math.sqrt(1.0 + sigma_max ** 2)


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE: d = (x − D(x; σ)) / σ,  x' = x + (σ' − σ)·d."""
    d = (x - denoised) / sigma
    return x + (sigma_next - sigma) * d


def denoising_loss(unet_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                   P_mean: float, P_std: float, generator: torch.Generator | None) -> torch.Tensor:
    """EDM training loss of clean latents ``z [B, ...]``: σ ~ lnN(P_mean, P_std²) per video, x = z + σ·n,
    ``mean_B[ (σ²+1)/σ² · mean((D(x; σ) − z)²) ]`` with the preconditioned denoiser D of ``denoise``."""
    gdev = generator.device if generator is not None else "cpu"
    sigma = sample_sigma(z.shape[0], P_mean, P_std, generator, gdev).to(z.device)
    noise = torch.randn(z.shape, generator=generator, device=generator.device if generator is not None else z.device,
                        dtype=torch.float32).to(z.device)
    denoised = denoise(unet_fn, z + append_dims(sigma, z.ndim) * noise, sigma)
    per_video = ((denoised.float() - z) ** 2).flatten(1).mean(1)
    return (loss_weight(sigma) * per_video).mean()
