import math

import pytest
import torch

from hi3d.models import edm


def test_precondition_closed_form():
    for s in (0.002, 0.1, 1.0, 3.7, 700.0):
        c_skip, c_out, c_in, c_noise = edm.precondition(torch.tensor(s, dtype=torch.float64))
        assert c_skip.item() == pytest.approx(1 / (s * s + 1), rel=1e-12)
        assert c_out.item() == pytest.approx(-s / math.sqrt(s * s + 1), rel=1e-12)
        assert c_in.item() == pytest.approx(1 / math.sqrt(s * s + 1), rel=1e-12)
        assert c_noise.item() == pytest.approx(0.25 * math.log(s), rel=1e-12)


def test_denoiser_at_small_sigma_returns_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 5, generator=g)
    w = torch.randn(4, 4, generator=g)
    net = lambda xi, c: torch.einsum("bfchw,cd->bfdhw", xi, w) + c.view(-1, 1, 1, 1, 1)  # arbitrary F
    out = edm.denoise(net, x, torch.full((2,), 1e-6))
    assert torch.allclose(out, x, atol=1e-4)
    # and it is not the identity at a large σ
    assert (edm.denoise(net, x, torch.full((2,), 5.0)) - x).abs().max() > 0.1


def test_denoiser_with_ideal_v_recovers_clean_signal():
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.5, 20.0], dtype=torch.float64)
    x = x0 + sigma[:, None] * n
    c_skip, c_out, c_in, _ = edm.precondition(sigma[:, None])
    v = (x0 - c_skip * x) / c_out  # the network target of v-prediction
    assert torch.allclose(edm.denoise(lambda xi, c: v, x, sigma), x0, atol=1e-9)


def test_sample_sigma_lognormal_and_seeded():
    s = edm.sample_sigma(200_000, 1.0, 1.6, torch.Generator().manual_seed(0))
    assert s.shape == (200_000,) and (s > 0).all()
    assert s.log().mean().item() == pytest.approx(1.0, abs=0.02)
    assert s.log().std().item() == pytest.approx(1.6, abs=0.02)
    a = edm.sample_sigma(4, generator=torch.Generator().manual_seed(3))
    b = edm.sample_sigma(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_loss_weight_noise_aug_and_dropout():
    s = torch.tensor([0.1, 1.0, 10.0])
    assert torch.allclose(edm.loss_weight(s), (s ** 2 + 1) / s ** 2)
    a = edm.noise_aug_strength(200_000, torch.Generator().manual_seed(0))
    assert a.log().mean().item() == pytest.approx(-3.0, abs=0.01)
    assert a.log().std().item() == pytest.approx(0.5, abs=0.01)
    m = edm.condition_dropout(200_000, 0.1, torch.Generator().manual_seed(0))
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert (1 - m.mean().item()) == pytest.approx(0.1, abs=0.005)
    assert edm.condition_dropout(10, 0.0, torch.Generator()).min() == 1
    assert edm.condition_dropout(10, 1.0, torch.Generator()).max() == 0


def test_karras_sigmas_formula():
    s = edm.karras_sigmas(25, 0.002, 700.0, 7.0)
    assert s.shape == (26,) and s[-1] == 0
    assert s[0].item() == pytest.approx(700.0) and s[24].item() == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()
    i = 10
    expect = (700 ** (1 / 7) + i / 24 * (0.002 ** (1 / 7) - 700 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expect, rel=1e-12)


def _euler_gaussian(n: int, d: float) -> torch.Tensor:
    sig = edm.karras_sigmas(n, 0.002, 700.0).tolist()
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * edm.initial_noise_scale(sig[0])
    for s, s_next in zip(sig[:-1], sig[1:]):
        x = edm.euler_step(x, x * d * d / (d * d + s * s), s, s_next)
    return x


def test_euler_sampler_reproduces_gaussian_data():
    # data ~ N(0, d²): the exact denoiser is D(x; σ) = x·d² / (d² + σ²); Euler EDM from σ_max = 700 must
    # land on samples with std d, with a first-order error shrinking as the steps grow.
    d = 0.5
    err = {n: abs(_euler_gaussian(n, d).std().item() - d) for n in (25, 100, 400)}
    assert err[400] < 0.02 * d
    assert err[400] < err[100] < err[25]
    assert err[25] / err[400] > 8  # ~ first order: 16x the steps, > 8x smaller error
