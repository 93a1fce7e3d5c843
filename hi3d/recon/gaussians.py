"""3D Gaussian splatting fitted to an orbit (Kerbl et al. 2023), on CPU or CUDA.

``fit_gaussians(orbit, cfg) -> GaussianModel``: initialise from random points in the visual hull of the
view masks (a sphere when every mask is empty), optimise L1 + D-SSIM (λ = 0.2) against the views on a
white background with Adam (per-group learning rates of 3DGS, means decayed exponentially), densify and
prune by the 3DGS rules, seeded by ``cfg.seed`` through ``torch.Generator``s only.

Densification is our own clone/split/prune (the rules of gsplat's ``DefaultStrategy``: mean screen-space
gradient in NDC units > ``grow_grad2d``; clone if the largest scale <= ``grow_scale3d`` x scene extent,
else split into two samples of the Gaussian with scales / 1.6; prune opacity < ``prune_opacity`` and,
after the first opacity reset, scales > ``prune_scale3d`` x extent). gsplat's strategy runs on CPU
tensors too, but its split draws from the global RNG, which would make runs irreproducible without
seeding global state.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from hi3d import cameras
from hi3d.data.orbit import Orbit
from hi3d.devices import resolve_device
from hi3d.errors import Hi3DError
from hi3d.io import atomic_path
from hi3d.recon.hull import carve
from hi3d.recon.losses import ssim
from hi3d.recon.rasterize import Rendered, quat_to_rotmat, rasterize

SH_C0 = 0.28209479177387814


@dataclasses.dataclass
class GaussianConfig:
    iterations: int = 500
    seed: int = 0
    device: str | None = None  # cpu | cuda | cuda:N | auto (CUDA when present); None: the command's device
    train_resolution: int = 256  # views are resized to this for fitting (0 = as given)
    sh_degree: int = 0
    num_points: int = 5000  # initial Gaussians
    init_opacity: float = 0.1
    hull_resolution: int = 64  # voxel grid for the visual hull (per axis, over [-0.6, 0.6]^3)
    hull_dilate_px: int = 2  # masks are dilated by this many pixels before carving
    # Adam learning rates of 3DGS; means scale with the scene extent and decay exponentially
    lr_means: float = 1.6e-4
    lr_means_final: float = 1.6e-6
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_colors: float = 2.5e-3  # SH degree 0; higher bands use lr / 20
    # loss
    ssim_lambda: float = 0.2  # (1 - λ) L1 + λ (1 - SSIM)
    mask_weight: float = 0.1  # optional L1 between rendered alpha and the view alpha
    # densification (3DGS / gsplat DefaultStrategy rules)
    densify_start: int = 100
    densify_stop: int = 350
    densify_every: int = 50
    grow_grad2d: float = 2e-4
    grow_scale3d: float = 0.01
    prune_opacity: float = 0.005
    prune_scale3d: float = 0.1
    opacity_reset_every: int = 3000  # 3DGS default; >= iterations disables it
    max_gaussians: int = 60000
    # rasteriser
    tile_size: int = 8
    chunk_elements: int = 1 << 18  # CPU rasteriser block size (elements of [tiles, K, pixels])
    num_threads: int = 0  # torch CPU threads during the fit; 0 = auto: the free cores, re-checked (hi3d.threads)
    progress: bool = True


class GaussianModel(torch.nn.Module):
    """``N`` Gaussians: means ``[N, 3]``, log-scales ``[N, 3]``, quats ``[N, 4]`` (wxyz), opacity logits
    ``[N]``, SH coefficients ``sh0 [N, 1, 3]`` and ``shN [N, (d+1)²-1, 3]`` (colour = SH + 0.5, clamped >= 0)."""

    def __init__(self, means, scales, quats, opacities, sh0, shN, sh_degree: int = 0):
        super().__init__()
        self.params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in dict(
            means=means, scales=scales, quats=quats, opacities=opacities, sh0=sh0, shN=shN).items()})
        self.sh_degree = sh_degree

    def __len__(self) -> int:
        return self.params["means"].shape[0]

    def colors(self, cam_centre: torch.Tensor) -> torch.Tensor:
        """``[N, 3]`` RGB seen from ``cam_centre [3]``."""
        p = self.params
        if self.sh_degree == 0:
            return (SH_C0 * p["sh0"][:, 0] + 0.5).clamp_min(0)
        from gsplat.cuda._torch_impl import _spherical_harmonics  # plain torch

        dirs = p["means"] - cam_centre.to(p["means"])
        return (_spherical_harmonics(self.sh_degree, dirs, torch.cat([p["sh0"], p["shN"]], 1)) + 0.5).clamp_min(0)

    def render(self, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int, background=(1.0, 1.0, 1.0),
               **kwargs) -> Rendered:
        """One view: ``rgb [H, W, 3]``, ``alpha [H, W]``, ``depth [H, W]`` (see ``hi3d.recon.rasterize``)."""
        p = self.params
        bg = None if background is None else torch.tensor(background, dtype=p["means"].dtype, device=p["means"].device)
        return rasterize(p["means"], p["quats"], torch.exp(p["scales"]), torch.sigmoid(p["opacities"]),
                         self.colors(c2w[:3, 3]), c2w, K, width, height, background=bg, **kwargs)

    def save(self, path: str | Path, **extra) -> None:
        """Atomic ``.pt`` with the parameters, the SH degree and anything in ``extra``."""
        with atomic_path(path) as tmp:
            torch.save({"params": {k: v.detach().cpu() for k, v in self.params.items()},
                        "sh_degree": self.sh_degree, **extra}, tmp)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> GaussianModel:
        path = Path(path)
        if not path.is_file():
            raise Hi3DError(f"{path}: no Gaussian model file")
        data = torch.load(path, map_location=device, weights_only=True)
        return cls(**data["params"], sh_degree=data["sh_degree"])


# ------------------------------------------------------------------------------------------------
# initialisation
# ------------------------------------------------------------------------------------------------

def visual_hull_points(orbit: Orbit, resolution: int = 64, dilate_px: int = 2, extent: float = 0.6) -> torch.Tensor:
    """Centres ``[M, 3]`` of the voxels of ``[-extent, extent]³`` whose projection lies inside every
    (dilated) view mask; voxels projecting outside a view's frame are not carved by it. Returns the
    hull's boundary shell (voxels with an outside neighbour), or all hull voxels if the shell is empty."""
    ax = torch.linspace(-extent, extent, resolution, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    masks = F.max_pool2d(orbit.mask.float()[:, None], 2 * dilate_px + 1, stride=1, padding=dilate_px)[:, 0] > 0
    inside = carve(grid, masks, orbit.c2w, orbit.K, outside_frame_carves=False)
    vol = inside.reshape(1, 1, resolution, resolution, resolution).float()
    eroded = -F.max_pool3d(-vol, 3, stride=1, padding=1)
    shell = (vol - eroded).reshape(-1) > 0
    return grid[shell] if shell.any() else grid[inside]


def initial_model(orbit: Orbit, cfg: GaussianConfig, generator: torch.Generator) -> GaussianModel:
    """``cfg.num_points`` Gaussians at random points of the visual hull shell (jittered within a voxel), or
    uniformly in a sphere of radius 0.4 when no view has an object; colours from the views' mean colour."""
    n = cfg.num_points
    hull = visual_hull_points(orbit, cfg.hull_resolution, cfg.hull_dilate_px) if orbit.mask.any() else None
    if hull is not None and len(hull) > 0:
        voxel = 1.2 / (cfg.hull_resolution - 1)
        pick = torch.randint(len(hull), (n,), generator=generator)
        means = hull[pick] + (torch.rand(n, 3, generator=generator, dtype=torch.float64) - 0.5) * voxel
    else:
        d = F.normalize(torch.randn(n, 3, generator=generator, dtype=torch.float64), dim=-1)
        means = 0.4 * d * torch.rand(n, 1, generator=generator, dtype=torch.float64) ** (1 / 3)
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(means.numpy()).query(means.numpy(), k=4)
    scale = torch.from_numpy(((dist[:, 1:] ** 2).mean(1)) ** 0.5).clamp_min(1e-4)
    rgb = orbit.rgb_on_white()[orbit.mask].mean(0) if orbit.mask.any() else torch.full((3,), 0.5)
    sh0 = ((rgb.double() - 0.5) / SH_C0).expand(n, 1, 3).clone()
    num_rest = (cfg.sh_degree + 1) ** 2 - 1
    quats = torch.zeros(n, 4, dtype=torch.float64)
    quats[:, 0] = 1
    return GaussianModel(means.float(), scale.log()[:, None].expand(n, 3).float().contiguous(), quats.float(),
                         torch.full((n,), math.log(cfg.init_opacity / (1 - cfg.init_opacity))), sh0.float(),
                         torch.zeros(n, num_rest, 3), cfg.sh_degree)


# ------------------------------------------------------------------------------------------------
# optimisation
# ------------------------------------------------------------------------------------------------

def scene_extent(c2w: torch.Tensor) -> float:
    """3DGS' spatial learning-rate scale: 1.1 x the largest camera distance from the cameras' centroid
    (at least 1.1 x the orbit radius for cameras on a circle)."""
    centres = c2w[:, :3, 3]
    return 1.1 * float(max((centres - centres.mean(0)).norm(dim=-1).max(), centres.norm(dim=-1).max()))


def make_optimizer(model: GaussianModel, cfg: GaussianConfig, extent: float) -> torch.optim.Adam:
    lrs = dict(means=cfg.lr_means * extent, scales=cfg.lr_scales, quats=cfg.lr_quats,
               opacities=cfg.lr_opacities, sh0=cfg.lr_colors, shN=cfg.lr_colors / 20)
    return torch.optim.Adam([{"params": [model.params[k]], "lr": lr, "name": k} for k, lr in lrs.items()],
                            eps=1e-15)


@torch.no_grad()
def _edit(model: GaussianModel, opt: torch.optim.Adam, fn, state_fn) -> None:
    """Replace every parameter ``p`` by ``fn(name, p)`` and its Adam moments ``m`` by ``state_fn(m)``."""
    for group in opt.param_groups:
        name, old = group["name"], group["params"][0]
        new = torch.nn.Parameter(fn(name, old.detach()))
        state = opt.state.pop(old, None)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state_fn(state[key])
            opt.state[new] = state
        group["params"][0] = new
        model.params[name] = new


class Densifier:
    """3DGS adaptive density control (see the module docstring)."""

    def __init__(self, cfg: GaussianConfig, extent: float, generator: torch.Generator):
        self.cfg, self.extent, self.gen = cfg, extent, generator
        self.grad2d = self.count = None
        self.resets = 0

    @torch.no_grad()
    def accumulate(self, info: dict, n: int) -> None:
        g = info["means2d"].grad
        if g is None:
            return
        if self.grad2d is None or len(self.grad2d) != n:
            self.grad2d = torch.zeros(n, device=g.device)
            self.count = torch.zeros(n, device=g.device)
        g = g.float() * torch.tensor([info["width"] / 2, info["height"] / 2], device=g.device)
        seen = info["radii"] > 0
        self.grad2d[seen] += g[seen].norm(dim=-1)
        self.count[seen] += 1

    @torch.no_grad()
    def step(self, step: int, model: GaussianModel, opt: torch.optim.Adam) -> dict:
        cfg, stats = self.cfg, {}
        if cfg.densify_start <= step < cfg.densify_stop and step % cfg.densify_every == 0 and self.grad2d is not None:
            p = model.params
            avg = self.grad2d / self.count.clamp_min(1)
            big_grad = (avg > cfg.grow_grad2d) & (self.count > 0)
            room = max(cfg.max_gaussians - len(model), 0)
            if big_grad.sum() > room:  # keep the largest gradients
                keep = torch.topk(avg.masked_fill(~big_grad, -1), room).indices
                big_grad = torch.zeros_like(big_grad)
                big_grad[keep] = True
            small = torch.exp(p["scales"]).max(-1).values <= cfg.grow_scale3d * self.extent
            clone, split = big_grad & small, big_grad & ~small
            stats.update(cloned=int(clone.sum()), split=int(split.sum()))
            self._clone_split(model, opt, clone, split)
            prune = torch.sigmoid(model.params["opacities"]) < cfg.prune_opacity
            if self.resets > 0:
                prune |= torch.exp(model.params["scales"]).max(-1).values > cfg.prune_scale3d * self.extent
            if prune.all():
                prune[:] = False
            stats["pruned"] = int(prune.sum())
            keep = ~prune
            _edit(model, opt, lambda _, t: t[keep], lambda m: m[keep])
            self.grad2d = self.count = None
        if step > 0 and step % cfg.opacity_reset_every == 0 and step < cfg.iterations:
            cap = math.log(0.01 / 0.99)
            _edit(model, opt, lambda k, t: t.clamp_max(cap) if k == "opacities" else t,
                  lambda m: m)
            for group in opt.param_groups:
                if group["name"] == "opacities":
                    st = opt.state[group["params"][0]]
                    st["exp_avg"].zero_(), st["exp_avg_sq"].zero_()
            self.resets += 1
        return stats

    def _clone_split(self, model, opt, clone, split):
        p = model.params
        sel = torch.nonzero(split).squeeze(1)
        scales = torch.exp(p["scales"][sel])
        R = quat_to_rotmat(p["quats"][sel])
        noise = torch.randn(2, len(sel), 3, generator=self.gen).to(scales)
        samples = torch.einsum("nij,nj,bnj->bni", R, scales, noise).reshape(-1, 3)
        rest = ~split
        n_new = int(clone.sum()) + 2 * len(sel)

        def fn(name, t):
            if name == "means":
                new_split = (t[sel][None] + samples.reshape(2, -1, 3)).reshape(-1, 3)
            elif name == "scales":
                new_split = torch.log(scales / 1.6).repeat(2, 1)
            else:
                new_split = t[sel].repeat((2,) + (1,) * (t.dim() - 1))
            return torch.cat([t[rest], t[clone], new_split])

        _edit(model, opt, fn, lambda m: torch.cat([m[rest], torch.zeros((n_new,) + m.shape[1:], dtype=m.dtype,
                                                                              device=m.device)]))


def _training_views(orbit: Orbit, cfg: GaussianConfig, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rgb on white [N, h, w, 3], alpha [N, h, w], K [N, 3, 3])`` at the training resolution."""
    rgb, alpha, K = orbit.rgb_on_white(), orbit.rgba[..., 3], orbit.K.clone()
    size = cfg.train_resolution
    if size and (orbit.height != size or orbit.width != size):
        h = size
        w = round(orbit.width * size / orbit.height)
        x = torch.cat([rgb, alpha[..., None]], -1).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(h, w), mode="area" if h < orbit.height else "bilinear", align_corners=None)
        x = x.permute(0, 2, 3, 1)
        rgb, alpha = x[..., :3], x[..., 3]
        K = torch.stack([cameras.scale_intrinsics(k, w / orbit.width, h / orbit.height) for k in K])
    return rgb.float().to(device), alpha.float().to(device), K


def fit_gaussians(orbit: Orbit, cfg: GaussianConfig, checkpoint: str | Path | None = None,
                  checkpoint_every: int = 250) -> GaussianModel:
    """Fit Gaussians to the views of ``orbit`` (white background). With ``checkpoint``, the state is saved
    there every ``checkpoint_every`` steps (atomically) and a run finding it resumes from it; the result
    equals the uninterrupted run's."""
    if len(orbit) == 0:
        raise Hi3DError("fit_gaussians: the orbit has no views")
    from hi3d.threads import cpu_threads

    with cpu_threads(cfg.num_threads) as threads:
        return _fit(orbit, cfg, checkpoint, checkpoint_every, threads)


def _fit(orbit, cfg, checkpoint, checkpoint_every, threads) -> GaussianModel:
    from tqdm import tqdm

    device = resolve_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    extent = scene_extent(orbit.c2w)
    model = initial_model(orbit, cfg, gen).to(device)
    opt = make_optimizer(model, cfg, extent)
    densifier = Densifier(cfg, extent, gen)
    rgb, alpha, K = _training_views(orbit, cfg, device)
    H, W = rgb.shape[1:3]
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        start = _load_checkpoint(checkpoint, model, opt, densifier, gen, cfg, device)
    decay = (cfg.lr_means_final / cfg.lr_means) ** (1 / max(cfg.iterations, 1))
    bar = tqdm(range(start, cfg.iterations), desc="3DGS", disable=not cfg.progress, initial=start,
               total=cfg.iterations)
    for step in bar:
        threads.update()
        i = _view_order(cfg.seed, step // len(orbit), len(orbit))[step % len(orbit)]
        for group in opt.param_groups:
            if group["name"] == "means":
                group["lr"] = cfg.lr_means * extent * decay ** step
        out = model.render(orbit.c2w[i], K[i], W, H, tile_size=cfg.tile_size, chunk_elements=cfg.chunk_elements) \
            if device.type == "cpu" else model.render(orbit.c2w[i], K[i], W, H)
        out.info["means2d"].retain_grad()
        loss = view_loss(out, rgb[i], alpha[i], cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        densifier.accumulate(out.info, len(model))
        opt.step()
        densifier.step(step + 1, model, opt)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", n=len(model))
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.iterations:
            _save_checkpoint(checkpoint, step + 1, model, opt, densifier, gen)
    bar.close()
    return model


def view_loss(out: Rendered, rgb: torch.Tensor, alpha: torch.Tensor, cfg: GaussianConfig) -> torch.Tensor:
    """3DGS loss of one rendered view against ``rgb [H, W, 3]`` (on white) and ``alpha [H, W]``:
    ``(1 - λ) L1 + λ (1 - SSIM)`` (λ = ``ssim_lambda``, SSIM differentiable) + ``mask_weight`` L1 on alpha."""
    loss = (1 - cfg.ssim_lambda) * (out.rgb - rgb).abs().mean()
    if cfg.ssim_lambda > 0:
        loss = loss + cfg.ssim_lambda * (1 - ssim(out.rgb, rgb)[0])
    if cfg.mask_weight > 0:
        loss = loss + cfg.mask_weight * (out.alpha - alpha).abs().mean()
    return loss


def _view_order(seed: int, epoch: int, n: int) -> list[int]:
    """The views of one epoch in a random order that depends only on (seed, epoch), so resuming is exact."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def _save_checkpoint(path, step, model, opt, densifier, gen) -> None:
    with atomic_path(path) as tmp:
        torch.save({"step": step, "params": {k: v.detach().cpu() for k, v in model.params.items()},
                    "optimizer": opt.state_dict(), "generator": gen.get_state(), "resets": densifier.resets,
                    "grad2d": densifier.grad2d, "count": densifier.count}, tmp)


def _load_checkpoint(path, model, opt, densifier, gen, cfg, device) -> int:
    data = torch.load(path, map_location=device, weights_only=True)
    _edit(model, opt, lambda k, t: data["params"][k].to(device), lambda m: m)
    opt.load_state_dict(data["optimizer"])
    gen.set_state(data["generator"])
    densifier.resets, densifier.grad2d, densifier.count = data["resets"], data["grad2d"], data["count"]
    return int(data["step"])
