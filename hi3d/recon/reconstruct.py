"""``hi3d reconstruct ORBIT_DIR --out DIR --num-interp 16``: 3DGS view interpolation -> NeuS -> mesh.

Writes ``DIR/interp/`` (the M interpolated views, an orbit folder), ``DIR/neus.pt`` (NeuS checkpoint),
``DIR/mesh.glb``, ``mesh.obj`` (+ ``mesh.mtl``, ``mesh.png`` when textured), ``mesh.ply`` (in the source
file's coordinates, +Y up; ``mesh.texture``: UV atlas baked from the views, or vertex colours),
``DIR/turntable.png`` (the mesh rendered at 8 azimuths), ``DIR/stages.json`` (fingerprints of the finished
stages) and ``DIR/run.json``. Re-running the command skips the stages whose inputs are unchanged (see
``reconstruct``), redoes the others and those after them, and resumes an interrupted 3DGS or NeuS fit
of the same inputs from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from hi3d import cameras
from hi3d.config import to_dict
from hi3d.data.orbit import Orbit, concat_orbits, load_orbit, save_orbit
from hi3d.devices import resolve_device
from hi3d.errors import Hi3DError
from hi3d.io import contact_sheet, save_png, write_json
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


EXECUTION_KEYS = ("progress", "num_threads", "checkpoint_every", "chunk", "chunk_elements")  # not in fingerprints


def views_hash(orbit: Orbit) -> str:
    """sha256 of what an orbit holds (images, cameras, normalisation, depth and normals when loaded)."""
    h = hashlib.sha256()
    for t in (orbit.rgba, orbit.c2w, orbit.K, orbit.normalization, orbit.depth, orbit.normal):
        if t is not None:
            t = torch.as_tensor(t).detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def fingerprint(**inputs) -> dict:
    """``{"hash": sha256 of inputs, "inputs": inputs}``; config dataclasses enter without their execution keys."""
    inputs = {k: {c: v for c, v in to_dict(x).items() if c not in EXECUTION_KEYS} if dataclasses.is_dataclass(x) else x
              for k, x in inputs.items()}
    return {"hash": hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), "inputs": inputs}


def changes(old: dict | None, new: dict) -> list[str]:
    """What differs between two fingerprints, e.g. ``["num_interp", "config.lr"]`` (``["no fingerprint"]``)."""
    if not old or "inputs" not in old:
        return ["no fingerprint"]
    out = []
    a, b = old["inputs"], new["inputs"]
    for k in sorted(a.keys() | b.keys()):
        if a.get(k) == b.get(k):
            continue
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += [f"{k}.{c}" for c in sorted(a[k].keys() | b[k].keys()) if a[k].get(c) != b[k].get(c)]
        else:
            out.append(k)
    return out


class Stages:
    """``DIR/stages.json``: the fingerprint of every finished stage, written atomically after it."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def check(self, name: str, fp: dict, entry: dict, outputs_present: bool) -> bool:
        """True when ``name`` is finished with the same fingerprint; else records in ``entry`` why it is redone."""
        entry["fingerprint"] = fp["hash"]
        old = self.done.get(name)
        if outputs_present and old is not None and old.get("hash") == fp["hash"]:
            return True
        if old is not None:
            entry["redone_because"] = changes(old, fp) if outputs_present else ["outputs missing"]
        self.forget(name)
        return False

    def forget(self, name: str) -> None:
        if self.done.pop(name, None) is not None:
            write_json(self.path, self.done)

    def finish(self, name: str, fp: dict) -> None:
        self.done[name] = fp
        write_json(self.path, self.done)


def reconstruct(orbit_dir: str | Path, out_dir: str | Path, num_interp: int, cfg: ReconstructConfig,
                progress: bool = True, callback: Callable[[int, dict], None] | None = None) -> dict[str, Path]:
    """Run (or resume) the whole reconstruction; returns the written files by name.

    Each stage is keyed on what it is made from (the views' content, M, its config section, the
    fingerprints of the stages before it): it is skipped when ``DIR/stages.json`` holds the same
    fingerprint and its outputs exist, else redone (with every stage after it); ``run.json`` records
    each stage's fingerprint and, when redone, ``redone_because`` (the inputs that changed)."""
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
    stages = Stages(out)
    files: dict[str, Path] = {}
    source = views_hash(orbit)
    rec.add(views_sha256=source)

    views, interp_fp = orbit, None
    if num_interp > 0:
        from hi3d.recon.interpolate import interpolate_views

        interp_dir = out / "interp"
        interp_fp = fingerprint(views=source, num_interp=num_interp, config=cfg.gaussians)
        with rec.stage("interpolate", device=devices["interpolate"]) as entry:
            done = stages.check("interpolate", interp_fp, entry, (interp_dir / "cameras.json").is_file())
            entry["skipped"] = done
            if done:
                interp = load_orbit(interp_dir, load_depth=False)
            else:  # the fit's checkpoint is named by the fingerprint: only the same fit resumes from it
                ckpt = interp_dir / f"gaussians.ckpt-{interp_fp['hash'][:16]}.pt"
                for stale in interp_dir.glob("gaussians.ckpt*.pt"):
                    if stale != ckpt:
                        stale.unlink()
                gcfg = dataclasses.replace(cfg.gaussians, progress=cfg.gaussians.progress and progress)
                interp = interpolate_views(orbit, num_interp, gcfg, checkpoint=ckpt)
                save_orbit(interp, interp_dir)
                ckpt.unlink(missing_ok=True)
                stages.finish("interpolate", interp_fp)
        files["interp"] = interp_dir
        interp.depth = interp.depth if orbit.depth is not None else None
        interp.normal = None
        views = concat_orbits(orbit, interp)
    else:
        stages.forget("interpolate")

    ckpt = out / "neus.pt"
    neus_fp = fingerprint(views=source, num_interp=num_interp, interpolate=interp_fp and interp_fp["hash"],
                          config=cfg.neus)
    with rec.stage("neus", device=devices["neus"]) as entry:
        saved = torch.load(ckpt, map_location="cpu", weights_only=False) if ckpt.is_file() else None
        same = saved is not None and saved.get("fingerprint", {}).get("hash") == neus_fp["hash"]
        if saved is not None and not same:  # made from something else: start over
            entry["redone_because"] = changes(saved.get("fingerprint"), neus_fp)
            ckpt.unlink()
        done = int(saved["step"]) if same else 0
        entry.update(fingerprint=neus_fp["hash"], skipped=done >= cfg.neus.iterations, resumed_from_step=done,
                     num_views=len(views))
        if not entry["skipped"]:
            stages.forget("neus")
            fit_neus(views, cfg.neus, ckpt, progress=progress, callback=callback,
                     checkpoint_extra={"fingerprint": neus_fp})
        stages.finish("neus", neus_fp)
    files["checkpoint"] = ckpt

    mesh_paths = {fmt: out / f"mesh.{fmt}" for fmt in FORMATS}
    mesh = None
    mesh_fp = fingerprint(neus=neus_fp["hash"], config=cfg.mesh)
    with rec.stage("mesh", device=devices["mesh"]) as entry:
        entry["skipped"] = stages.check("mesh", mesh_fp, entry, all(p.is_file() for p in mesh_paths.values()))
        if not entry["skipped"]:
            model, _ = load_model(ckpt, cfg.neus.device)
            mesh = extract_mesh(model, cfg.mesh, views)
            export_mesh(mesh, orbit.normalization, out)
            entry.update(vertices=len(mesh.vertices), faces=len(mesh.faces), texture=cfg.mesh.texture)
            stages.finish("mesh", mesh_fp)
    files.update(mesh_paths)

    sheet = out / "turntable.png"
    sheet_fp = fingerprint(mesh=mesh_fp["hash"], views=cfg.turntable_views, resolution=cfg.turntable_resolution,
                           elevation=cfg.turntable_elevation)
    with rec.stage("turntable", device="pyrender") as entry:
        entry["skipped"] = stages.check("turntable", sheet_fp, entry, sheet.is_file())
        if not entry["skipped"]:
            from hi3d.data.mesh_io import load_world_mesh

            mesh = mesh if mesh is not None else load_world_mesh(mesh_paths["ply"], orbit.normalization)
            save_png(sheet, turntable(mesh, cfg))
            stages.finish("turntable", sheet_fp)
    files["turntable"] = sheet
    rec.finish(outputs={k: str(v) for k, v in files.items()})
    return files


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
