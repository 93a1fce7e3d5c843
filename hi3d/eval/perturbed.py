"""A CPU stand-in for generated views: a ground-truth orbit with controlled, seeded multi-view inconsistency.

The interpolated views of the reconstruction (paper Table 4) are meant to help with *generated* views, which
disagree with each other in ways ground-truth renders never do. ``perturb_orbit`` makes such views from the
source mesh of a ground-truth orbit, each kind with its own knob, all scaled by one ``strength`` (0 = the
ground truth exactly), every draw from its own seeded ``torch.Generator``:

- ``shape``: each view renders its own smoothly deformed copy of the mesh: every vertex moves by the smooth
  random vector field ``F(x) = Σ_k a_k sin(ω_k·x + φ_k)`` (``shape_waves`` waves, ``shape_frequency``
  cycles per unit), scaled so that the largest vertex displacement is exactly ``strength * shape``
  (unit-cube units). A field of position only, so the mesh stays closed (no cracks at UV seams).
- ``jitter_deg``: each view is rendered from its nominal camera rotated rigidly about the object centre by
  exactly ``strength * jitter_deg`` degrees, about a random axis perpendicular to the camera's position
  (the camera stays on the orbit sphere, looking at the centre); the view is labelled with the nominal pose.
- ``exposure_ev`` and ``white_balance``: the object's RGB is multiplied by ``2**e``, ``e ~ N(0, (strength *
  exposure_ev)²)``, and per channel by ``exp(n_c)``, ``n_c ~ N(0, (strength * white_balance)²)`` recentred
  to geometric mean 1 (white balance changes hue, not exposure); clipped to [0, 1].
- ``degrade``: the views composited on white are blended towards the stage-2 training degradation
  (``hi3d.data.degradation.degrade_video``, Real-ESRGAN second order, its own masking off since shape errors
  are the ``shape`` kind) with weight ``strength * degrade`` (at most 1).

View 0 is the input view and stays clean (a generator returns the input image as frame 0). Every view's
draws are written to ``perturbation.json`` beside the orbit (true camera, angle, gains, blend weight), and
the same record goes into ``cameras.json`` ``meta.perturbation``. The defaults were chosen a priori as
"small, of the kind a multi-view generator makes", not fitted to any ablation result.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import trimesh

from hi3d.data.orbit import Orbit, load_orbit, save_orbit
from hi3d.errors import Hi3DError
from hi3d.io import write_json

KINDS = ("shape", "jitter", "appearance", "degrade")  # each kind draws from its own generator


@dataclasses.dataclass
class PerturbConfig:
    """Amounts at ``strength = 1``; every amount is multiplied by ``strength``."""

    strength: float = 1.0
    shape: float = 0.01  # largest vertex displacement, unit-cube units
    shape_waves: int = 4
    shape_frequency: float = 1.5  # cycles per unit length
    jitter_deg: float = 2.0  # camera rotation about the object centre, degrees
    exposure_ev: float = 0.15  # std of the per-view exposure change, stops
    white_balance: float = 0.05  # std of the per-channel log gain
    degrade: float = 0.5  # blend weight towards the stage-2 degradation


def check_config(cfg: PerturbConfig) -> None:
    """Clear errors for amounts that make no sense (negative, a blend weight above 1)."""
    for name in ("strength", "shape", "jitter_deg", "exposure_ev", "white_balance", "degrade", "shape_frequency"):
        if getattr(cfg, name) < 0:
            raise Hi3DError(f"perturb.{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.shape_waves < 1:
        raise Hi3DError(f"perturb.shape_waves must be >= 1, got {cfg.shape_waves}")
    if cfg.strength * cfg.degrade > 1:
        raise Hi3DError(f"perturb.strength * perturb.degrade is a blend weight and must be <= 1, "
                        f"got {cfg.strength * cfg.degrade}")


def _generator(seed: int, kind: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * len(KINDS) + KINDS.index(kind))


def axis_angle(axis: torch.Tensor, angle_rad: float) -> torch.Tensor:
    """Rotation matrix ``[3, 3]`` float64 of ``angle_rad`` about the unit ``axis [3]`` (Rodrigues)."""
    a = axis.to(torch.float64) / axis.norm()
    k = torch.tensor([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle_rad) * k + (1 - math.cos(angle_rad)) * k @ k


def jitter_camera(c2w: torch.Tensor, angle_deg: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``c2w [4, 4]`` rotated about the origin by ``angle_deg`` about a random axis perpendicular to the camera
    centre; returns ``(c2w', axis [3])``."""
    c = c2w[:3, 3].to(torch.float64)
    t1 = torch.linalg.cross(c, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    if t1.norm() < 1e-9 * c.norm():
        t1 = torch.linalg.cross(c, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    t1 = t1 / t1.norm()
    t2 = torch.linalg.cross(c / c.norm(), t1)
    phi = float(torch.rand((), generator=g, dtype=torch.float64)) * 2 * math.pi
    axis = math.cos(phi) * t1 + math.sin(phi) * t2
    R = axis_angle(axis, math.radians(angle_deg))
    out = c2w.clone().to(torch.float64)
    out[:3, :3] = R @ out[:3, :3]
    out[:3, 3] = R @ out[:3, 3]
    return out, axis


def displacement_field(points: np.ndarray, amplitude: float, waves: int, frequency: float,
                       g: torch.Generator) -> np.ndarray:
    """The smooth random field ``F`` at ``points [V, 3]`` scaled so ``max_v |F(v)| = amplitude``: ``[V, 3]``."""
    omega = torch.randn(waves, 3, generator=g, dtype=torch.float64)
    omega = omega / omega.norm(dim=1, keepdim=True) * (2 * math.pi * frequency)
    phase = torch.rand(waves, 3, generator=g, dtype=torch.float64) * 2 * math.pi
    amp = torch.randn(waves, 3, generator=g, dtype=torch.float64)
    p = torch.from_numpy(np.asarray(points, dtype=np.float64))
    field = (torch.sin((p @ omega.T)[:, :, None] + phase[None]) * amp[None]).sum(1)  # [V, 3]
    peak = float(field.norm(dim=1).max()) if len(field) else 0.0
    return (field * (amplitude / peak if peak > 0 else 0.0)).numpy()


def deformed_geometries(geoms: list[trimesh.Trimesh], cfg: PerturbConfig, g: torch.Generator) -> list[trimesh.Trimesh]:
    """World-space meshes moved by one draw of ``displacement_field`` (peak ``strength * shape`` over all)."""
    amplitude = cfg.strength * cfg.shape
    verts = np.concatenate([m.vertices for m in geoms])
    d = displacement_field(verts, amplitude, cfg.shape_waves, cfg.shape_frequency, g)
    out, start = [], 0
    for m in geoms:
        n = len(m.vertices)
        copy = m.copy()
        copy.vertices = m.vertices + d[start:start + n]
        out.append(copy)
        start += n
    return out


def appearance_gains(cfg: PerturbConfig, g: torch.Generator) -> tuple[float, torch.Tensor]:
    """One view's ``(exposure gain, white-balance gains [3] with geometric mean 1)``."""
    ev = float(torch.randn((), generator=g, dtype=torch.float64)) * cfg.strength * cfg.exposure_ev
    n = torch.randn(3, generator=g, dtype=torch.float64) * cfg.strength * cfg.white_balance
    return 2.0 ** ev, torch.exp(n - n.mean())


def perturb_orbit(gt: Orbit, cfg: PerturbConfig, seed: int) -> tuple[Orbit, list[dict]]:
    """Perturbed views of the ground-truth orbit ``gt`` (rendered again from ``gt.meta["mesh"]``) at its
    nominal cameras: ``(orbit [N, H, W, 4] like gt, per-view records)``."""
    from hi3d.data.degradation import DegradationConfig, degrade_video
    from hi3d.data.mesh_io import load_mesh
    from hi3d.data.render import _geometries, render_views

    check_config(cfg)
    source = gt.meta.get("mesh")
    if not source:
        raise Hi3DError("the perturbed generator re-renders the object, but the ground-truth orbit's "
                        "cameras.json records no source mesh (meta.mesh)")
    scene, norm = load_mesh(source)
    geoms = _geometries(scene)
    gens = {k: _generator(seed, k) for k in KINDS}
    rgba, records = gt.rgba.clone(), [{"view": 0, "clean": True}]
    shading, ambient = gt.meta.get("shading", "lambert"), gt.meta.get("ambient", 0.5)
    for i in range(1, len(gt)):
        meshes = deformed_geometries(geoms, cfg, gens["shape"]) if cfg.strength * cfg.shape > 0 else geoms
        angle = cfg.strength * cfg.jitter_deg
        true_c2w, axis = jitter_camera(gt.c2w[i], angle, gens["jitter"])
        view = render_views(trimesh.Scene(meshes), true_c2w[None], gt.K[i], gt.width, gt.height,
                            normalization=norm, shading=shading, ambient=ambient, with_depth=False)
        x = view.rgba[0].clone()
        gain, wb = appearance_gains(cfg, gens["appearance"])
        on = x[..., 3] > 0
        x[..., :3][on] = (x[..., :3][on] * (gain * wb).float()).clamp(0, 1)
        rgba[i] = x
        records.append({"view": i, "true_c2w": true_c2w.tolist(), "jitter_deg": angle, "jitter_axis": axis.tolist(),
                        "exposure_gain": gain, "white_balance_gains": wb.tolist(),
                        "shape_amplitude": cfg.strength * cfg.shape})
    weight = min(cfg.strength * cfg.degrade, 1.0)
    if weight > 0:
        a = rgba[..., 3:]
        on_white = rgba[..., :3] * a + (1 - a)
        dcfg = DegradationConfig(object_mask_prob=0.0, degrade_size=gt.width)
        degraded = degrade_video(on_white.permute(0, 3, 1, 2)[None], dcfg, gens["degrade"])[0].permute(0, 2, 3, 1)
        mixed = (1 - weight) * on_white + weight * degraded
        straight = torch.where(a > 0, (mixed - (1 - a)) / a.clamp_min(1e-6), torch.ones_like(mixed)).clamp(0, 1)
        rgba[1:, ..., :3] = straight[1:]
    for r in records[1:]:
        r["degrade_weight"] = weight
    meta = {**gt.meta, "perturbation": {"config": dataclasses.asdict(cfg), "seed": seed}}
    out = dataclasses.replace(gt, rgba=rgba, depth=None, normal=None, meta=meta,
                              source=["input"] + ["generated"] * (len(gt) - 1))
    return out, records


def generate_perturbed(gt_dir: Path, out_dir: Path, cfg: PerturbConfig, seed: int) -> Path:
    """``perturb_orbit`` of the orbit folder ``gt_dir`` written to ``out_dir`` (+ ``perturbation.json``)."""
    gt = load_orbit(gt_dir, load_depth=False)
    orbit, records = perturb_orbit(gt, cfg, seed)
    out_dir = Path(out_dir)
    write_json(out_dir / "perturbation.json", {"config": dataclasses.asdict(cfg), "seed": seed, "views": records})
    save_orbit(orbit, out_dir)
    return out_dir
