"""The shared sampler (``hi3d.models.sampler``) against independent implementations: diffusers'
``EulerDiscreteScheduler`` configured as SVD's (EDM, v-prediction, Karras σ, continuous timesteps) with the
guidance of diffusers' SVD pipeline, and the release's stage-2 blending loop written out here."""

import ast
import math
from pathlib import Path

import pytest
import torch

from hi3d.models import edm, sampler
from hi3d.models.conditioning import added_time_ids
from hi3d.models.stage1 import Stage1Config, TinyConfig, tiny_components
from hi3d.models.svd import unet_forward

ROOT = Path(__file__).resolve().parents[1]
B, F, H = 2, 3, 8


@pytest.fixture(scope="module")
def conditions():
    cfg = Stage1Config(num_frames=F, resolution=32, tiny=TinyConfig(enabled=True))
    unet = tiny_components(cfg).unet
    g = torch.Generator().manual_seed(3)
    concat = torch.randn(B, F, 4, H, H, generator=g)
    clip = torch.randn(B, 1, unet.config.cross_attention_dim, generator=g)
    ids = added_time_ids(cfg.slots, torch.tensor([10.0, 30.0]), torch.tensor(0.02), 5.0)
    noise = torch.randn(B, F, 4, H, H, generator=g)
    return unet, concat, clip, ids, noise


def diffusers_euler(unet, concat, clip, ids, noise, steps, gmin, gmax):
    """diffusers' SVD recipe, written independently of hi3d's sampler: scheduler config of
    stabilityai/stable-video-diffusion-img2vid(-xt), CFG on the model output with the SVD pipeline's per-frame
    linspace guidance. Returns the scheduler's σ and x after every step."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True, sigma_min=0.002,
        sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous", steps_offset=1)
    sched.set_timesteps(steps)
    scale = torch.linspace(gmin, gmax, F).view(1, F, 1, 1, 1)
    x = noise * sched.init_noise_sigma
    xs = []
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        tt = t.reshape(1).expand(2 * B)
        v_u, v_c = unet_forward(unet, torch.cat([inp, inp]), tt, torch.cat([torch.zeros_like(concat), concat]),
                                torch.cat([torch.zeros_like(clip), clip]), torch.cat([ids, ids])).chunk(2)
        x = sched.step(v_u + scale * (v_c - v_u), t, x).prev_sample
        xs.append(x)
    return sched.sigmas, xs


@pytest.mark.parametrize("steps", [4, 25])
@torch.no_grad()
def test_sampler_matches_diffusers_euler_scheduler_per_step(conditions, steps):
    """Tolerance: σ schedules agree to 1e-6 relative (diffusers keeps σ in float32, hi3d in float64); every
    Euler step's x agrees to 2e-5 relative to its largest magnitude (measured: at most 3.5e-6; float32 arithmetic
    on σ up to 700)."""
    unet, concat, clip, ids, noise = conditions
    ref_sigmas, ref_xs = diffusers_euler(unet, concat, clip, ids, noise, steps, 1.0, 2.5)
    sigmas = edm.karras_sigmas(steps, 0.002, 700.0, 7.0)
    torch.testing.assert_close(sigmas.float(), ref_sigmas.float(), rtol=1e-6, atol=0)
    xs = []
    denoiser = sampler.guided_denoiser(unet, concat, clip, ids, 1.0, 2.5)
    out = sampler.sample(denoiser, noise, sigmas.tolist(), "noise", callback=lambda i, x: xs.append(x))
    assert len(xs) == len(ref_xs) == steps
    for i, (x, ref) in enumerate(zip(xs, ref_xs)):
        err = float((x - ref).abs().max() / ref.abs().max())
        assert err < 2e-5, f"step {i}: relative difference {err:.2e}"
    assert torch.equal(out, xs[-1])


def test_sequential_guidance_equals_batched(conditions):
    unet, concat, clip, ids, noise = conditions
    x = noise * 3.0
    a = sampler.guided_denoiser(unet, concat, clip, ids, 1.0, 2.5)(x, 3.0)
    b = sampler.guided_denoiser(unet, concat, clip, ids, 1.0, 2.5, sequential=True)(x, 3.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_release_blend_start_is_the_releases_loop():
    """Row 4 of issue 13 (``pipeline_i2v_eval_v02.py``): before step i, x ← x(1 − α_i) + (z + σ_i ε₀) α_i with
    α_i = (½(1 + cos(i/n)))^40 and the same ε₀ as the start x = ε₀·√(1 + σ_0²); written out here with a
    recording denoiser (any D works: the blend is outside it)."""
    g = torch.Generator().manual_seed(0)
    noise, z = torch.randn(1, 2, 4, 4, 4, generator=g), torch.randn(1, 2, 4, 4, 4, generator=g)
    n = 25
    sigmas = edm.karras_sigmas(n).tolist()
    seen = []

    def denoiser(x, sigma):  # a contraction towards a fixed point, so every step changes x
        seen.append(x.clone())
        return 0.5 * x + 0.1

    sampler.sample(denoiser, noise, sigmas, "release_blend", init=z)
    x = noise * math.sqrt(1 + sigmas[0] ** 2)
    for i in range(n):
        alpha = math.pow(0.5 * (1 + math.cos(i * 1.0 / n)), 40.0)
        x = x * (1 - alpha) + (noise * sigmas[i] + z) * alpha
        torch.testing.assert_close(seen[i], x, rtol=1e-6, atol=1e-5)
        d = 0.5 * x + 0.1
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
    assert sampler.blend_weight(0, n) == 1.0 and 6e-5 < sampler.blend_weight(n - 1, n) < 8e-5


def test_sdedit_and_noise_starts():
    g = torch.Generator().manual_seed(0)
    noise, z = torch.randn(1, 2, 4, 4, 4, generator=g), torch.randn(1, 2, 4, 4, 4, generator=g)
    sigmas = edm.karras_sigmas(10).tolist()
    seen = []
    sampler.sample(lambda x, s: seen.append((s, x.clone())) or x * 0, noise, sigmas, "sdedit", init=z, strength=0.8)
    assert len(seen) == 8 and seen[0][0] == sigmas[2]
    torch.testing.assert_close(seen[0][1], z + sigmas[2] * noise)
    seen.clear()
    sampler.sample(lambda x, s: seen.append((s, x.clone())) or x * 0, noise, sigmas, "noise")
    torch.testing.assert_close(seen[0][1], noise * math.sqrt(1 + 700.0 ** 2))
    with pytest.raises(Exception, match="start 'blend'"):
        sampler.sample(lambda x, s: x, noise, sigmas, "blend")
    with pytest.raises(Exception, match="initial latents"):
        sampler.sample(lambda x, s: x, noise, sigmas, "release_blend")


def test_per_video_generators():
    gens = [torch.Generator().manual_seed(s) for s in (4, 9)]
    both = sampler.batch_randn(gens, (3, 5), "cpu")
    alone = sampler.batch_randn([torch.Generator().manual_seed(9)], (3, 5), "cpu")
    assert torch.equal(both[1:], alone)
    one = torch.Generator().manual_seed(4)
    assert torch.equal(sampler.batch_randn([one, one], (3, 5), "cpu"),
                       torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(4)))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_models_never_import_pipelines_or_training():
    """No import cycle models <-> pipelines: nothing under hi3d/models imports hi3d.pipelines or hi3d.training,
    not even inside a function."""
    bad = {f"{p.name}: {m}" for p in (ROOT / "hi3d" / "models").glob("*.py") for m in _imports(p)
           if m.startswith(("hi3d.pipelines", "hi3d.training"))}
    assert not bad, sorted(bad)
