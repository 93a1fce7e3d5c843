"""The 3DGS view interpolator (paper section 4.4): fit Gaussians to an orbit, render M views between
adjacent orbit views, write them as an orbit folder (``source = "interpolated"``) for NeuS.

``hi3d interpolate ORBIT_DIR --out DIR --num-interp 16 [--config configs/recon/gaussians.yaml] [key=value ...]``
writes ``DIR/cameras.json``, ``rgba/``, ``depth/``, ``contact_sheet.png``, ``gaussians.pt`` and ``run.json``.
A re-run with the same config and orbit reuses ``gaussians.pt``, or resumes an interrupted fit from
``gaussians.ckpt-<config hash>.pt`` (saved every 250 steps).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

from hi3d import cameras
from hi3d.data.orbit import Orbit, load_orbit, save_orbit
from hi3d.devices import resolve_device
from hi3d.errors import Hi3DError
from hi3d.recon.gaussians import GaussianConfig, GaussianModel, fit_gaussians


def interpolated_cameras(orbit: Orbit, num_interp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c2w [M, 4, 4], azimuth_deg [M], elevation_deg [M], radius [M])`` of the M cameras spread evenly
    between adjacent views of ``orbit`` (``hi3d.cameras.interpolated_views``), looking at the origin."""
    az, el, r = cameras.interpolated_views(orbit.azimuth_deg, orbit.elevation_deg, orbit.radius, num_interp)
    return cameras.orbit_c2w(az, el, r), az, el, r


@torch.no_grad()
def render_orbit_views(model: GaussianModel, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int,
                       alpha_threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rgba [M, H, W, 4] straight alpha, depth [M, H, W])`` of ``model`` at cameras ``c2w [M, 4, 4]``,
    ``K [3, 3]``; depth is 0 where alpha < ``alpha_threshold`` (the orbit layout's background)."""
    rgba, depth = [], []
    for c in c2w:
        out = model.render(c, K, width, height, background=None)
        a = out.alpha.clamp(0, 1)
        rgb = torch.where(a[..., None] > 0, out.rgb / a[..., None].clamp_min(1e-6), torch.ones_like(out.rgb))
        rgba.append(torch.cat([rgb.clamp(0, 1), a[..., None]], -1).float().cpu())
        depth.append(torch.where(a >= alpha_threshold, out.depth, 0.0).float().cpu())
    return torch.stack(rgba), torch.stack(depth)


def interpolate_views(orbit: Orbit, num_interp: int, cfg: GaussianConfig, model: GaussianModel | None = None,
                      checkpoint: str | Path | None = None) -> Orbit:
    """Fit 3DGS to ``orbit`` (unless ``model`` is given) and render ``num_interp`` interpolated views at the
    orbit's resolution and intrinsics (view 0's K). Returns an ``Orbit`` with ``source = "interpolated"``."""
    check_views(orbit)
    if num_interp < 0:
        raise Hi3DError(f"--num-interp must be >= 0 (got {num_interp})")
    model = model if model is not None else fit_gaussians(orbit, cfg, checkpoint=checkpoint)
    c2w, az, el, r = interpolated_cameras(orbit, num_interp)
    K = orbit.K[0]
    if num_interp == 0:
        rgba = torch.zeros(0, orbit.height, orbit.width, 4)
        depth = torch.zeros(0, orbit.height, orbit.width)
    else:
        rgba, depth = render_orbit_views(model, c2w.to(resolve_device(cfg.device)), K, orbit.width, orbit.height)
    return Orbit(rgba=rgba, c2w=c2w, K=K.expand(num_interp, 3, 3).clone(), azimuth_deg=az, elevation_deg=el,
                 radius=r, normalization=orbit.normalization.clone(), depth=depth,
                 source=["interpolated"] * num_interp, meta={**orbit.meta, "interpolated_from": len(orbit)})


def check_views(orbit: Orbit) -> None:
    """Clear errors for orbits the interpolator cannot use."""
    if len(orbit) < 2:
        raise Hi3DError(f"the orbit has {len(orbit)} view(s); interpolation needs at least 2")
    empty = [i for i in range(len(orbit)) if orbit.rgba[i, ..., 3].max() <= 0]
    if len(empty) == len(orbit):
        raise Hi3DError("every view has alpha 0 everywhere (no object): give views with an alpha mask "
                        "(RGBA with the object opaque), e.g. from 'hi3d render-orbit'")
    if empty:
        raise Hi3DError(f"views {empty} have alpha 0 everywhere (no object); every view must show the object")


def cli(argv: list[str]) -> int:
    from hi3d.cli import add_config_args
    from hi3d.config import load_config
    from hi3d.provenance import RunRecord

    parser = argparse.ArgumentParser(prog="hi3d interpolate", description=__doc__.split("\n\n")[0])
    parser.add_argument("orbit_dir", help="orbit folder (cameras.json + rgba/) with the views to interpolate")
    parser.add_argument("--out", required=True, help="output folder for the interpolated views")
    parser.add_argument("--num-interp", type=int, default=16, help="M, the number of views to add (default 16)")
    add_config_args(parser)
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(GaussianConfig, args.config, args.overrides)
    orbit = load_orbit(args.orbit_dir, load_depth=False)
    check_views(orbit)
    out = Path(args.out)
    device = resolve_device(cfg.device)
    rec = RunRecord(out, "interpolate", config=cfg, seed=cfg.seed, device=device)
    rec.add(orbit_dir=str(args.orbit_dir), num_interp=args.num_interp)
    model_path = out / "gaussians.pt"
    fingerprint = _fingerprint(cfg, args.orbit_dir)
    ckpt = out / f"gaussians.ckpt-{hashlib.sha256(fingerprint.encode()).hexdigest()[:10]}.pt"
    model = None
    if model_path.is_file():
        saved = torch.load(model_path, map_location="cpu", weights_only=True)
        if saved.get("config") == fingerprint:
            model = GaussianModel.load(model_path, device)
            print(f"reusing {model_path}")
    if model is None:
        with rec.stage("fit") as entry:
            model = fit_gaussians(orbit, cfg, checkpoint=ckpt)  # resumes an interrupted fit of this config
            entry["num_gaussians"] = len(model)
        model.save(model_path, config=fingerprint)
        ckpt.unlink(missing_ok=True)
    with rec.stage("render") as entry:
        views = interpolate_views(orbit, args.num_interp, cfg, model=model)
        entry["num_views"] = len(views)
    with rec.stage("write"):
        if len(views):
            save_orbit(views, out)
        else:
            save_orbit(views, out, sheet=False)
    rec.finish()
    print(f"wrote {len(views)} interpolated views to {out}")
    return 0


def _fingerprint(cfg: GaussianConfig, orbit_dir) -> str:
    import json

    from hi3d.config import to_dict

    c = {k: v for k, v in to_dict(cfg).items() if k != "progress"}
    return json.dumps({"config": c, "orbit": str(Path(orbit_dir).resolve())}, sort_keys=True)
