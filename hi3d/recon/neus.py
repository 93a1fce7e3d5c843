"""NeuS (Wang et al. 2021): an SDF with a hash-grid encoding, a colour network and a learnable variance,
optimised by volume rendering on the views of an orbit.

World units: objects fill the unit cube at the origin, cameras sit at r ~ 1.5; rays are sampled inside a
bounding sphere of radius ``bound_radius``; the background is white. Rendering uses NeuS's unbiased,
occlusion-aware weights: for a section [t_i, t_i+1] with SDF estimates s_prev, s_next at its ends,
``alpha_i = max((Phi(s_prev) - Phi(s_next)) / Phi(s_prev), 0)`` with the logistic CDF ``Phi(s) =
sigmoid(inv_s * s)``, and ``w_i = alpha_i prod_{j<i} (1 - alpha_j)``. Samples: ``num_samples``
stratified samples, then ``up_sample_steps`` rounds of NeuS importance up-sampling (``num_importance``
in total) with a fixed, growing sharpness.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hi3d import cameras
from hi3d.config import to_dict
from hi3d.data.orbit import Orbit
from hi3d.devices import resolve_device
from hi3d.io import atomic_path
from hi3d.recon.hashgrid import HashGrid


@dataclasses.dataclass
class NeuSConfig:
    """NeuS optimisation; defaults are sized for a CPU (a few minutes at 256², 16-32 views)."""

    iterations: int = 1000
    batch_rays: int = 512
    lr: float = 1e-2
    lr_variance: float = 1e-3
    warmup_iters: int = 50
    lr_final_ratio: float = 0.1
    num_samples: int = 32  # stratified samples per ray
    num_importance: int = 32  # up-sampled samples per ray (split over up_sample_steps)
    up_sample_steps: int = 2
    bound_radius: float = 0.9  # sampling sphere; the unit cube's corners are at 0.866
    # SDF network
    num_levels: int = 12
    features_per_level: int = 2
    log2_hashmap_size: int = 15
    base_resolution: int = 16
    max_resolution: int = 256
    start_levels: int = 4  # coarse-to-fine: levels enabled at step 0 (num_levels = all at once)
    level_every: int = 60  # steps between enabling further levels
    hidden_dim: int = 64
    sdf_layers: int = 1  # hidden layers of the SDF MLP
    feature_dim: int = 15
    init_radius: float = 0.5  # geometric initialisation: SDF of this sphere
    color_hidden_dim: int = 64
    color_layers: int = 2
    init_variance: float = 0.3  # inv_s = exp(10 * variance)
    eikonal_points: int = 2048  # points per step for the eikonal loss (half on the rays, half uniform)
    # losses
    color_weight: float = 1.0
    eikonal_weight: float = 0.1
    mask_weight: float = 0.1
    depth_weight: float = 0.0  # used only when the views carry depth
    normal_weight: float = 0.0  # used only when the views carry normals
    volume_weight: float = 0.0  # minimal-volume prior: mean occupancy of the uniform eikonal points
    # run
    seed: int = 0
    device: str | None = None  # cpu | cuda | cuda:N | auto; None: the command's device (auto when run alone)
    num_threads: int = 0  # torch CPU threads during the fit; 0 = auto: the free cores, re-checked (hi3d.threads)
    checkpoint_every: int = 200
    chunk: int = 65536  # points per forward pass when querying the SDF without gradients


# ----------------------------------------------------------------------------------------------- model

def fibonacci_sphere(n: int) -> torch.Tensor:
    """``n`` unit vectors ``[n, 3]`` spread evenly over the sphere (Fibonacci lattice)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = i * math.pi * (3 - math.sqrt(5))
    r = (1 - z * z).sqrt()
    return torch.stack([r * phi.cos(), r * phi.sin(), z], -1).float()


class SDFNetwork(nn.Module):
    """World points ``[N, 3]`` -> SDF ``[N]`` and feature ``[N, feature_dim]``.

    Input of the MLP: the position concatenated with the hash-grid features. Geometric initialisation
    (Atzmon & Lipman 2020, as in IDR/NeuS), made deterministic for a narrow MLP: the first layer's
    position weights are ``n`` unit directions spread evenly on the sphere (IDR draws them at random,
    which with n = 64 leaves ~20% error), its hash-feature weights are zero, further hidden layers start
    as identities, and the SDF output has weights ``4/n`` and bias ``-init_radius``. Since the mean of
    ``relu(d . x)`` over evenly spread unit ``d`` is ``|x|/4``, the initial SDF is ``|x| - init_radius``
    up to the softplus smoothing and the discretisation of the directions.
    """

    def __init__(self, cfg: NeuSConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.bound = cfg.bound_radius
        self.encoding = HashGrid(cfg.num_levels, cfg.features_per_level, cfg.log2_hashmap_size,
                                 cfg.base_resolution, cfg.max_resolution, generator=generator)
        dims = [3 + self.encoding.output_dim] + [cfg.hidden_dim] * cfg.sdf_layers + [1 + cfg.feature_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        with torch.no_grad():
            n = cfg.hidden_dim
            first, last = self.layers[0], self.layers[-1]
            first.weight.zero_()
            first.weight[:, :3] = fibonacci_sphere(n)
            first.bias.zero_()
            for layer in self.layers[1:-1]:
                layer.weight.copy_(torch.eye(n))
                layer.bias.zero_()
            last.weight.normal_(0.0, 1.0 / math.sqrt(n), generator=generator)
            last.weight[0] = 4.0 / n
            last.bias.zero_()
            last.bias[0] = -cfg.init_radius
        self.act = nn.Softplus(beta=100)
        self.active_levels = cfg.num_levels  # coarse-to-fine: hash levels looked up (the others are zero)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([x, self.encoding((x / self.bound + 1) / 2, self.active_levels)], dim=-1)
        for layer in self.layers[:-1]:
            h = self.act(layer(h))
        out = self.layers[-1](h)
        return out[:, 0], out[:, 1:]

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0]

    def with_gradient(self, x: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SDF ``[N]``, feature ``[N, C]`` and the SDF gradient ``[N, 3]`` at ``x [N, 3]``."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            sdf, feat = self.forward(x)
            grad, = torch.autograd.grad(sdf.sum(), x, create_graph=create_graph)
        return sdf, feat, grad


class ColorNetwork(nn.Module):
    """(position, view direction, feature) -> RGB in [0, 1]."""

    def __init__(self, cfg: NeuSConfig, generator: torch.Generator | None = None):
        super().__init__()
        dims = [6 + cfg.feature_dim] + [cfg.color_hidden_dim] * cfg.color_layers + [3]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        with torch.no_grad():
            for layer in self.layers:
                bound = 1 / math.sqrt(layer.weight.shape[1])
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.zero_()

    def forward(self, x, view_dir, feature) -> torch.Tensor:
        h = torch.cat([x, view_dir, feature], dim=-1)
        for layer in self.layers[:-1]:
            h = F.relu(layer(h))
        return torch.sigmoid(self.layers[-1](h))


class NeuSModel(nn.Module):
    def __init__(self, cfg: NeuSConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.sdf_net = SDFNetwork(cfg, generator)
        self.color_net = ColorNetwork(cfg, generator)
        self.variance = nn.Parameter(torch.tensor(float(cfg.init_variance)))

    def inv_s(self) -> torch.Tensor:
        return torch.exp(self.variance * 10.0).clamp(1e-6, 1e6)

    def set_progress(self, step: int) -> None:
        """Coarse-to-fine hash levels: ``start_levels`` at step 0, one more every ``level_every`` steps."""
        n = min(self.cfg.num_levels, self.cfg.start_levels + step // max(self.cfg.level_every, 1))
        self.sdf_net.active_levels = n

    @torch.no_grad()
    def query_sdf(self, x: torch.Tensor) -> torch.Tensor:
        """SDF ``[N]`` at world points ``x [N, 3]``, in chunks, without gradients."""
        return torch.cat([self.sdf_net.sdf(c) for c in x.split(self.cfg.chunk)]) if len(x) else x[:, 0]

    @torch.no_grad()
    def query_color(self, x: torch.Tensor, view_dir: torch.Tensor) -> torch.Tensor:
        """RGB ``[N, 3]`` at world points ``x [N, 3]`` seen along unit ``view_dir [N, 3]``."""
        out = [self.color_net(xc, vc, self.sdf_net(xc)[1]) for xc, vc in zip(x.split(self.cfg.chunk),
                                                                           view_dir.split(self.cfg.chunk))]
        return torch.cat(out) if out else x.new_zeros(0, 3)

    def sdf_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """SDF gradient ``[N, 3]`` at ``x [N, 3]`` (no graph kept), in chunks."""
        out = [self.sdf_net.with_gradient(xc, create_graph=False)[2] for xc in x.split(self.cfg.chunk)]
        return torch.cat(out) if out else x.new_zeros(0, 3)


# ----------------------------------------------------------------------------------------------- rendering

def sphere_near_far(rays_o: torch.Tensor, rays_d: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry/exit distances ``[R]`` of unit rays with the origin-centred sphere; ``near == far`` on a miss."""
    b = (rays_o * rays_d).sum(-1)
    c = (rays_o * rays_o).sum(-1) - radius ** 2
    disc = (b * b - c).clamp(min=0).sqrt()
    near, far = (-b - disc).clamp(min=0), (-b + disc).clamp(min=0)
    return near, torch.maximum(far, near)


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """Deterministic inverse-CDF samples ``[R, n]`` from piecewise-constant ``weights [R, B-1]`` on ``bins [R, B]``."""
    w = weights + 1e-5
    cdf = torch.cumsum(w / w.sum(-1, keepdim=True), -1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)
    u = torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=bins.dtype, device=bins.device).expand(bins.shape[0], n)
    idx = torch.searchsorted(cdf, u.contiguous(), right=True)
    lo, hi = (idx - 1).clamp(min=0), idx.clamp(max=cdf.shape[-1] - 1)
    c0, c1 = cdf.gather(1, lo), cdf.gather(1, hi)
    b0, b1 = bins.gather(1, lo), bins.gather(1, hi)
    t = ((u - c0) / (c1 - c0).clamp(min=1e-5)).clamp(0, 1)
    return b0 + t * (b1 - b0)


def neus_alpha(prev_sdf: torch.Tensor, next_sdf: torch.Tensor, inv_s) -> torch.Tensor:
    """Section opacity from the SDF at its two ends (NeuS eq. 13), clipped to [0, 1]."""
    prev_cdf, next_cdf = torch.sigmoid(prev_sdf * inv_s), torch.sigmoid(next_sdf * inv_s)
    return ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).clamp(0.0, 1.0)


def composite_weights(alpha: torch.Tensor) -> torch.Tensor:
    """``w_i = alpha_i prod_{j<i}(1 - alpha_j)`` along the last dim."""
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha + 1e-7], -1), -1)[:, :-1]
    return alpha * trans


@torch.no_grad()
def up_sample(model: NeuSModel, rays_o, rays_d, z, sdf, n: int, inv_s: float) -> torch.Tensor:
    """NeuS importance sampling: ``n`` new depths ``[R, n]`` from the weights of the current samples."""
    pts = rays_o[:, None] + rays_d[:, None] * z[..., None]
    inside = (pts.norm(dim=-1) < model.cfg.bound_radius)
    inside = (inside[:, :-1] | inside[:, 1:]).float()
    mid = (sdf[:, :-1] + sdf[:, 1:]) * 0.5
    dist = z[:, 1:] - z[:, :-1]
    cos = (sdf[:, 1:] - sdf[:, :-1]) / (dist + 1e-5)
    cos = torch.minimum(torch.cat([torch.zeros_like(cos[:, :1]), cos[:, :-1]], -1), cos)
    cos = cos.clamp(-1e3, 0.0) * inside
    alpha = neus_alpha(mid - cos * dist * 0.5, mid + cos * dist * 0.5, inv_s)
    return sample_pdf(z, composite_weights(alpha), n)


def render_rays(model: NeuSModel, rays_o: torch.Tensor, rays_d: torch.Tensor, generator: torch.Generator | None = None,
                train: bool = False, need_normal: bool = False) -> dict[str, torch.Tensor]:
    """Volume-render unit rays ``[R, 3]`` (white background).

    The SDF is evaluated at the sorted samples ``t_0 < ... < t_S-1``; section i = [t_i, t_i+1] gets the
    NeuS alpha of its end-point SDFs and the colour of its start point (position, view direction and
    feature; normals enter only through the eikonal/normal losses). Returns ``rgb [R, 3]``,
    ``opacity [R]``, ``depth [R]`` (distance along the ray), ``points [R*S, 3]`` and, with
    ``need_normal``, ``normal [R, 3]`` (world, weighted; needs SDF gradients). ``train`` jitters the
    stratified samples (``generator``).
    """
    cfg = model.cfg
    near, far = sphere_near_far(rays_o, rays_d, cfg.bound_radius)
    R, S = rays_o.shape[0], cfg.num_samples
    t = torch.linspace(0.0, 1.0, S, dtype=rays_o.dtype, device=rays_o.device).expand(R, S)
    if train:
        t = (t + torch.rand(R, 1, generator=generator, dtype=rays_o.dtype).to(rays_o.device) / (S - 1)).clamp(max=1)
    z = near[:, None] + (far - near)[:, None] * t
    if cfg.num_importance > 0 and cfg.up_sample_steps > 0:
        sdf = model.query_sdf((rays_o[:, None] + rays_d[:, None] * z[..., None]).reshape(-1, 3)).view(R, -1)
        per_step = cfg.num_importance // cfg.up_sample_steps
        for i in range(cfg.up_sample_steps):
            new_z = up_sample(model, rays_o, rays_d, z, sdf, per_step, 64.0 * 2 ** i)
            z, order = torch.sort(torch.cat([z, new_z], -1), -1)
            if i + 1 < cfg.up_sample_steps:
                new_sdf = model.query_sdf((rays_o[:, None] + rays_d[:, None] * new_z[..., None]).reshape(-1, 3))
                sdf = torch.cat([sdf, new_sdf.view(R, -1)], -1).gather(1, order)
    z = z.detach()
    pts = (rays_o[:, None] + rays_d[:, None] * z[..., None]).reshape(-1, 3)
    dirs = rays_d[:, None].expand(-1, z.shape[1], -1).reshape(-1, 3)
    if need_normal:
        sdf, feat, grad = model.sdf_net.with_gradient(pts, create_graph=train)
    else:
        sdf, feat = model.sdf_net(pts)
    sdf = sdf.view(R, -1)
    alpha = neus_alpha(sdf[:, :-1], sdf[:, 1:], model.inv_s())  # [R, S-1]
    inside = (pts.norm(dim=-1) < cfg.bound_radius).view(R, -1).to(alpha.dtype)
    weights = composite_weights(alpha * inside[:, :-1])
    color = model.color_net(pts, dirs, feat).view(R, -1, 3)[:, :-1]
    opacity = weights.sum(-1)
    out = {"rgb": (weights[..., None] * color).sum(1) + (1.0 - opacity)[:, None], "opacity": opacity,
           "depth": (weights * (z[:, :-1] + z[:, 1:]) * 0.5).sum(-1), "points": pts, "weights": weights}
    if need_normal:
        out["normal"] = (weights[..., None] * F.normalize(grad, dim=-1).view(R, -1, 3)[:, :-1]).sum(1)
    return out


@torch.no_grad()
def render_image(model: NeuSModel, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int,
                 batch: int = 4096) -> dict[str, torch.Tensor]:
    """Render one view: ``rgb [H, W, 3]``, ``opacity [H, W]``."""
    dev = next(model.parameters()).device
    o, d = cameras.get_rays(c2w, K, width, height)
    o, d = o.reshape(-1, 3).to(dev), d.reshape(-1, 3).to(dev)
    out = [render_rays(model, oc, dc) for oc, dc in zip(o.split(batch), d.split(batch))]
    return {"rgb": torch.cat([r["rgb"] for r in out]).view(height, width, 3).cpu(),
            "opacity": torch.cat([r["opacity"] for r in out]).view(height, width).cpu()}


# ----------------------------------------------------------------------------------------------- training

@dataclasses.dataclass
class RayData:
    """All pixels of an orbit as rays: ``origins``, ``dirs``, ``rgb`` ``[P, 3]``, ``alpha [P]``, optional
    ``depth [P]`` (distance along the ray, 0 on background) and ``normal [P, 3]``."""

    origins: torch.Tensor
    dirs: torch.Tensor
    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor | None = None
    normal: torch.Tensor | None = None


def orbit_rays(orbit: Orbit) -> RayData:
    o, d, t = [], [], []
    for i in range(len(orbit)):
        oi, di = cameras.get_rays(orbit.c2w[i], orbit.K[i], orbit.width, orbit.height)
        o.append(oi.reshape(-1, 3))
        d.append(di.reshape(-1, 3))
        forward = orbit.c2w[i, :3, 2].float()
        t.append(1.0 / (di.reshape(-1, 3) @ forward))  # ray distance per unit camera-z
    depth = None
    if orbit.depth is not None:
        depth = orbit.depth.reshape(len(orbit), -1).float() * torch.stack(t)
    return RayData(torch.cat(o), torch.cat(d), orbit.rgb_on_white().reshape(-1, 3).float(),
                   orbit.rgba[..., 3].reshape(-1).float(), None if depth is None else depth.reshape(-1),
                   None if orbit.normal is None else orbit.normal.reshape(-1, 3).float())


def make_optimizer(model: NeuSModel, cfg: NeuSConfig) -> torch.optim.Optimizer:
    params = [p for n, p in model.named_parameters() if n != "variance"]
    return torch.optim.Adam([{"params": params, "lr": cfg.lr},
                             {"params": [model.variance], "lr": cfg.lr_variance}], betas=(0.9, 0.99), eps=1e-15)


def lr_factor(step: int, cfg: NeuSConfig) -> float:
    """Linear warm-up then exponential decay to ``lr_final_ratio`` at the last step."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(cfg.iterations - cfg.warmup_iters, 1)
    return cfg.lr_final_ratio ** progress


def eikonal_points(points: torch.Tensor, cfg: NeuSConfig, generator: torch.Generator) -> torch.Tensor:
    """``eikonal_points`` points ``[E, 3]``: half drawn from the ray samples, half uniform in the sphere's cube."""
    n = cfg.eikonal_points // 2
    pick = torch.randint(0, points.shape[0], (n,), generator=generator).to(points.device)
    uniform = (torch.rand(cfg.eikonal_points - n, 3, generator=generator) * 2 - 1) * cfg.bound_radius
    return torch.cat([points[pick].detach(), uniform.to(points)])


def training_losses(model: NeuSModel, batch: dict[str, torch.Tensor], cfg: NeuSConfig,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    need_normal = cfg.normal_weight > 0 and "normal" in batch
    out = render_rays(model, batch["origins"], batch["dirs"], generator, train=True, need_normal=need_normal)
    losses = {"color": (out["rgb"] - batch["rgb"]).abs().mean()}
    sdf, _, g = model.sdf_net.with_gradient(eikonal_points(out["points"], cfg, generator), create_graph=True)
    losses["eikonal"] = ((g.norm(dim=-1) - 1) ** 2).mean()
    if cfg.volume_weight > 0:
        uniform = sdf[cfg.eikonal_points // 2:]
        losses["volume"] = torch.sigmoid(-uniform * model.inv_s().detach()).mean()
    acc = out["opacity"].clamp(1e-3, 1 - 1e-3)
    losses["mask"] = F.binary_cross_entropy(acc, batch["alpha"].clamp(0, 1))
    fg = batch["alpha"] > 0.5
    if cfg.depth_weight > 0 and "depth" in batch and fg.any():
        losses["depth"] = (out["depth"][fg] - batch["depth"][fg]).abs().mean()
    if need_normal and fg.any():
        losses["normal"] = (out["normal"][fg] - batch["normal"][fg]).abs().sum(-1).mean()
    weights = {"color": cfg.color_weight, "eikonal": cfg.eikonal_weight, "mask": cfg.mask_weight,
               "depth": cfg.depth_weight, "normal": cfg.normal_weight, "volume": cfg.volume_weight}
    losses["total"] = sum(weights[k] * v for k, v in losses.items())
    return losses


def save_checkpoint(path: Path, model: NeuSModel, optim: torch.optim.Optimizer, step: int,
                    generator: torch.Generator, **extra) -> None:
    """Atomic checkpoint: weights, Adam state, RNG state, step, config and ``extra`` (e.g. a fingerprint)."""
    with atomic_path(path) as tmp:
        torch.save({"step": step, "model": model.state_dict(), "optimizer": optim.state_dict(),
                    "generator": generator.get_state(), "config": to_dict(model.cfg), **extra}, tmp)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[NeuSModel, int]:
    """A trained model and its step from a checkpoint written by ``fit_neus``."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    cfg = NeuSConfig(**ckpt["config"])
    model = NeuSModel(cfg).to(device)
    model.load_state_dict(ckpt["model"])
    model.set_progress(ckpt["step"])
    return model, ckpt["step"]


def fit_neus(orbit: Orbit, cfg: NeuSConfig, checkpoint: str | Path | None = None, progress: bool = True,
             callback: Callable[[int, dict], None] | None = None, checkpoint_extra: dict | None = None) -> NeuSModel:
    """Optimise NeuS on ``orbit``; resumes from ``checkpoint`` when it exists (and returns at once if it
    is at the final step). ``callback(step, losses)`` runs after every step (logging, tests);
    ``checkpoint_extra`` is stored in every checkpoint."""
    device = resolve_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = NeuSModel(cfg, gen).to(device)
    optim = make_optimizer(model, cfg)
    start = 0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        start = ckpt["step"]
    model.set_progress(start)
    if start >= cfg.iterations:
        return model
    from hi3d.threads import cpu_threads

    with cpu_threads(cfg.num_threads) as threads:
        _train(model, optim, gen, orbit, cfg, start, ckpt_path, progress, callback, checkpoint_extra or {}, threads)
    model.set_progress(cfg.iterations)
    return model


def _train(model, optim, gen, orbit, cfg, start, ckpt_path, progress, callback, extra, threads) -> None:
    device = resolve_device(cfg.device)
    rays = orbit_rays(orbit)
    fields = {k: v.to(device) for k, v in dataclasses.asdict(rays).items() if v is not None}
    num = rays.origins.shape[0]
    bar = tqdm(total=cfg.iterations, initial=start, desc="NeuS", disable=not progress, dynamic_ncols=True)
    model.train()
    for step in range(start, cfg.iterations):
        threads.update()
        model.set_progress(step)
        for group, base in zip(optim.param_groups, (cfg.lr, cfg.lr_variance)):
            group["lr"] = base * lr_factor(step, cfg)
        idx = torch.randint(0, num, (cfg.batch_rays,), generator=gen).to(device)
        losses = training_losses(model, {k: v[idx] for k, v in fields.items()}, cfg, gen)
        optim.zero_grad(set_to_none=True)
        losses["total"].backward()
        optim.step()
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses['total'].item():.4f}", inv_s=f"{model.inv_s().item():.0f}")
        if ckpt_path is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.iterations):
            save_checkpoint(ckpt_path, model, optim, step + 1, gen, **extra)
        if callback is not None:
            callback(step, {k: v.item() for k, v in losses.items()})
    bar.close()
