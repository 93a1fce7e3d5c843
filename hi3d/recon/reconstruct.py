"""``hi3d reconstruct ORBIT_DIR --out DIR --num-interp 16``: 3DGS view interpolation -> NeuS -> mesh.

Writes ``DIR/interp/`` (the M interpolated views, an orbit folder), ``DIR/neus.pt`` (NeuS checkpoint),
``DIR/mesh.glb``, ``mesh.obj`` (+ ``mesh.mtl``, ``mesh.png`` when textured), ``mesh.ply`` (in the source
file's coordinates, +Y up; ``mesh.texture``: UV atlas baked from the views, or vertex colours),
``DIR/turntable.png`` (the mesh rendered at 8 azimuths) and ``DIR/run.json``. Re-running the command
skips finished stages (``interp/cameras.json`` present, NeuS checkpoint at its last step, mesh files
present) and resumes an interrupted NeuS fit from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from hi3d import cameras
from hi3d.config import to_dict
from hi3d.data.orbit import Orbit, concat_orbits, load_orbit, save_orbit
from hi3d.devices import resolve_device
from hi3d.errors import Hi3DError
from hi3d.io import contact_sheet, save_png
from hi3d.recon.gaussians import GaussianConfig
from hi3d.recon.mesh import FORMATS, MeshConfig, export_mesh, extract_mesh
from hi3d.recon.neus import NeuSConfig, fit_neus, load_model


@dataclasses.dataclass
class ReconstructConfig:
    device: str | None = None  # every stage's device unless its section sets one; None: the command's (auto alone)
    gaussians: GaussianConfig = dataclasses.field(default_factory=GaussianConfig)
    neus: NeuSConfig = dataclasses.field(default_factory=NeuSConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    turntable_views: int = 8
    turntable_resolution: int = 256
    turntable_elevation: float = 20.0  # degrees


def resolve_devices(cfg: ReconstructConfig, inherit: torch.device | str | None = None) -> ReconstructConfig:
    """``cfg`` with every stage's device made concrete (``cfg.device``, else ``inherit``, else auto; a section's
    own ``device`` wins); raises ``Hi3DError`` for a device this machine lacks."""
    top = resolve_device(cfg.device, inherit)
    section = lambda c: dataclasses.replace(c, device=str(resolve_device(c.device, top)))
    return dataclasses.replace(cfg, device=str(top), gaussians=section(cfg.gaussians), neus=section(cfg.neus))


def stage_devices(cfg: ReconstructConfig) -> dict[str, str]:
    """Device of each reconstruction stage of a ``resolve_devices`` config (the mesh is extracted on NeuS's)."""
    return {"interpolate": cfg.gaussians.device, "neus": cfg.neus.device, "mesh": cfg.neus.device}


def check_orbit(orbit: Orbit) -> None:
    """Clear errors for views NeuS cannot use: no object (empty alpha, or all white), or no alpha mask."""
    alpha = orbit.rgba[..., 3] > 0.5
    white = (orbit.rgb_on_white() > 0.98).all(-1)
    empty = [i for i in range(len(orbit)) if not (alpha[i] & ~white[i]).any()]
    if empty:
        raise Hi3DError(f"views {empty} show no object (all white or fully transparent): every view must "
                        "show the object on a white or transparent background")
    if alpha.all():
        raise Hi3DError("the views have no alpha mask (every pixel is opaque): NeuS needs RGBA views with "
                        "the background transparent (run 'hi3d render-orbit', or segment the images first)")


def _load_interp(path: Path, num_interp: int) -> Orbit | None:
    if not (path / "cameras.json").is_file():
        return None
    views = load_orbit(path, load_depth=False)
    return views if len(views) == num_interp else None


def reconstruct(orbit_dir: str | Path, out_dir: str | Path, num_interp: int, cfg: ReconstructConfig,
                progress: bool = True, callback: Callable[[int, dict], None] | None = None) -> dict[str, Path]:
    """Run (or resume) the whole reconstruction; returns the written files by name."""
    from hi3d.provenance import RunRecord

    if num_interp < 0:
        raise Hi3DError(f"--num-interp must be >= 0 (got {num_interp})")
    cfg = resolve_devices(cfg)
    devices = stage_devices(cfg)
    orbit = load_orbit(orbit_dir, load_depth=cfg.neus.depth_weight > 0, load_normal=cfg.neus.normal_weight > 0)
    check_orbit(orbit)
    out = Path(out_dir)
    rec = RunRecord(out, "reconstruct", config=cfg, seed=cfg.neus.seed, device=torch.device(cfg.neus.device))
    rec.add(orbit_dir=str(orbit_dir), num_interp=num_interp, devices=devices)
    files: dict[str, Path] = {}

    views = orbit
    if num_interp > 0:
        from hi3d.recon.interpolate import interpolate_views

        interp_dir = out / "interp"
        with rec.stage("interpolate", device=devices["interpolate"]) as entry:
            interp = _load_interp(interp_dir, num_interp)
            entry["skipped"] = interp is not None
            if interp is None:
                interp = interpolate_views(orbit, num_interp, cfg.gaussians,
                                           checkpoint=interp_dir / "gaussians.ckpt.pt")
                save_orbit(interp, interp_dir)
                (interp_dir / "gaussians.ckpt.pt").unlink(missing_ok=True)
        files["interp"] = interp_dir
        interp.depth = interp.depth if orbit.depth is not None else None
        interp.normal = None
        views = concat_orbits(orbit, interp)

    ckpt = out / "neus.pt"
    with rec.stage("neus", device=devices["neus"]) as entry:
        done = _checkpoint_step(ckpt, cfg.neus)
        entry["skipped"] = done >= cfg.neus.iterations
        entry["resumed_from_step"] = done
        entry["num_views"] = len(views)
        if not entry["skipped"]:
            fit_neus(views, cfg.neus, ckpt, progress=progress, callback=callback)
    files["checkpoint"] = ckpt

    mesh_paths = {fmt: out / f"mesh.{fmt}" for fmt in FORMATS}
    mesh = None
    with rec.stage("mesh", device=devices["mesh"]) as entry:
        entry["skipped"] = all(p.is_file() for p in mesh_paths.values())
        if not entry["skipped"]:
            model, _ = load_model(ckpt, cfg.neus.device)
            mesh = extract_mesh(model, cfg.mesh, views)
            export_mesh(mesh, orbit.normalization, out)
            entry.update(vertices=len(mesh.vertices), faces=len(mesh.faces), texture=cfg.mesh.texture)
    files.update(mesh_paths)

    sheet = out / "turntable.png"
    with rec.stage("turntable", device="pyrender") as entry:
        entry["skipped"] = sheet.is_file() and mesh is None
        if not entry["skipped"]:
            from hi3d.data.mesh_io import load_world_mesh

            mesh = mesh if mesh is not None else load_world_mesh(mesh_paths["ply"], orbit.normalization)
            save_png(sheet, turntable(mesh, cfg))
    files["turntable"] = sheet
    rec.finish(outputs={k: str(v) for k, v in files.items()})
    return files


def _checkpoint_step(path: Path, cfg: NeuSConfig) -> int:
    """Step of an existing NeuS checkpoint (0 if none); error if it was made with another config."""
    if not path.is_file():
        return 0
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    saved, current = {**to_dict(NeuSConfig()), **ckpt["config"]}, to_dict(cfg)  # keys added since: defaults
    if saved != current:
        changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        raise Hi3DError(f"{path} was written with a different NeuS config (changed: {', '.join(changed)}); "
                        "use a new --out folder or delete the checkpoint to start over")
    return int(ckpt["step"])


def turntable(mesh, cfg: ReconstructConfig) -> torch.Tensor:
    """Contact sheet ``[H', W', 3]`` of the world-space mesh at ``turntable_views`` azimuths."""
    from hi3d.data.render import render_views

    c2w, _, _ = cameras.orbit_poses(cfg.turntable_views, cfg.turntable_elevation)
    K = cameras.intrinsics(cfg.turntable_resolution)
    views = render_views(mesh, c2w, K, cfg.turntable_resolution, cfg.turntable_resolution, with_depth=False)
    return contact_sheet(list(views.rgba), cols=min(8, cfg.turntable_views))


def cli(argv: list[str]) -> int:
    from hi3d.cli import add_config_args
    from hi3d.config import load_config

    parser = argparse.ArgumentParser(prog="hi3d reconstruct", description=__doc__.split("\n\n")[0])
    parser.add_argument("orbit_dir", help="orbit folder (cameras.json + rgba/), e.g. from 'hi3d render-orbit'")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-interp", type=int, default=16, help="M interpolated views (0 = plain NeuS)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_config_args(parser)
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(ReconstructConfig, args.config, args.overrides)
    files = reconstruct(args.orbit_dir, args.out, args.num_interp, cfg, progress=not args.no_progress)
    print(f"wrote {files['glb']}, {files['obj'].name}, {files['ply'].name}, {files['turntable'].name} in {args.out}")
    return 0
