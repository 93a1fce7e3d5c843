"""The differentiable SSIM of the 3DGS loss: values against the window-by-window definition, gradients
against finite differences, and the D-SSIM term really reaching the Gaussians' gradients."""

import numpy as np
import pytest
import torch
from conftest import real_object

from hi3d.eval.metrics import ssim_reference
from hi3d.recon.gaussians import GaussianConfig, initial_model, view_loss
from hi3d.recon.losses import ssim


def _pair(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a.to(dtype), b.to(dtype)


def test_ssim_matches_the_windowed_definition():
    a, b = _pair((2, 20, 17, 3))
    got = ssim(a, b)
    assert got.dtype == torch.float32 and got.shape == (2,)
    for i in range(2):
        assert got[i].item() == pytest.approx(ssim_reference(a[i].numpy(), b[i].numpy()), abs=2e-6)
    assert ssim(a[0], a[0]).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match=">= 11 px"):
        ssim(a[:, :8], b[:, :8])


def test_ssim_gradient_matches_finite_differences():
    a, b = _pair((1, 13, 12, 2), seed=1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, y: ssim(x, y), (a.requires_grad_(), b.requires_grad_()))


@pytest.fixture(scope="module")
def bunny_view():
    from hi3d.data.render import RenderConfig, render_orbit

    return render_orbit(real_object("bunny"), RenderConfig(resolution=32, num_views=4))


def _loss_and_grad(model, orbit, cfg, i=1):
    for p in model.parameters():
        p.grad = None
    out = model.render(orbit.c2w[i], orbit.K[i], orbit.width, orbit.height)
    rgb, alpha = orbit.rgb_on_white()[i].to(out.rgb), orbit.rgba[i, ..., 3].to(out.rgb)
    loss = view_loss(out, rgb, alpha, cfg)
    loss.backward()
    return loss.item(), out.rgb.detach(), {k: p.grad.clone() for k, p in model.params.items() if p.grad is not None}


def test_3dgs_loss_gradient_has_the_dssim_term(bunny_view):
    """Gradient of the loss in the colours for λ = 1 (pure D-SSIM) equals the finite difference of
    1 - SSIM evaluated by the window-by-window reference, and the gradient changes with λ."""
    base = GaussianConfig(num_points=300, hull_resolution=24, mask_weight=0.0)
    model = initial_model(bunny_view, base, torch.Generator().manual_seed(0)).double()
    with torch.no_grad():  # varied colours, away from the clamp at 0
        model.params["sh0"].add_(torch.randn(model.params["sh0"].shape, generator=torch.Generator().manual_seed(1),
                                             dtype=torch.float64))
    grads = {lam: _loss_and_grad(model, bunny_view, GaussianConfig(ssim_lambda=lam, mask_weight=0.0))[2]
             for lam in (0.0, 0.2, 1.0)}
    for key in ("sh0", "means", "opacities"):
        assert not torch.allclose(grads[0.2][key], 0.8 * grads[0.0][key], rtol=1e-3, atol=0), key
        assert grads[1.0][key].abs().max() > 0, key
    target = bunny_view.rgb_on_white()[1].double().numpy()
    v = torch.randn(model.params["sh0"].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 1e-4

    def dssim(sign):
        with torch.no_grad():
            model.params["sh0"].add_(sign * eps * v)
            rgb = model.render(bunny_view.c2w[1], bunny_view.K[1], bunny_view.width, bunny_view.height).rgb
            model.params["sh0"].sub_(sign * eps * v)
        return 1 - ssim_reference(rgb.numpy(), target)

    fd = (dssim(1) - dssim(-1)) / (2 * eps)
    assert (grads[1.0]["sh0"] * v).sum().item() == pytest.approx(fd, rel=1e-4)
    assert np.isfinite(fd) and abs(fd) > 1e-6
