"""``hi3d demo``: render the 16-view orbit of a real object made by others, reconstruct it (3DGS
interpolation, M = 16, then NeuS), and print Chamfer distance and volume IoU against the source mesh.

Writes ``OUT/orbit/`` (the ground-truth orbit), ``OUT/recon/`` (everything ``hi3d reconstruct`` writes:
``mesh.glb/.obj/.ply``, ``turntable.png``, ``interp/``, ``run.json``), ``OUT/metrics.json`` and
``OUT/run.json``. Re-running resumes (finished stages are skipped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hi3d.data.real_objects import REAL_OBJECTS, resolve_object
from hi3d.errors import Hi3DError

QUALITY = {  # config file (relative to the repository's configs/recon) and orbit resolution
    "cpu": ("neus.yaml", 256),
    "high": ("neus_high.yaml", 512),
}


def config_path(quality: str) -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "recon" / QUALITY[quality][0]


def run_demo(out: Path, obj: str = "bunny", quality: str = "cpu", num_interp: int = 16,
             overrides: list[str] | tuple = (), progress: bool = True, resolution: int | None = None) -> dict:
    """Render, reconstruct, evaluate; ``resolution`` of the orbit (default: the quality's, 256² or 512²)."""
    import json

    from hi3d.config import load_config, to_dict
    from hi3d.data.mesh_io import load_world_mesh
    from hi3d.data.orbit import load_orbit, save_orbit
    from hi3d.data.render import RenderConfig, render_orbit
    from hi3d.eval.metrics import chamfer_distance, volume_iou
    from hi3d.io import write_json
    from hi3d.provenance import RunRecord
    from hi3d.recon.reconstruct import ReconstructConfig, reconstruct, resolve_devices

    source = resolve_object(obj)
    cfg_file = config_path(quality)
    if not cfg_file.is_file():
        raise Hi3DError(f"demo config {cfg_file} is missing (run the demo from a hi3d checkout)")
    cfg = load_config(ReconstructConfig, cfg_file, list(overrides))
    cfg = resolve_devices(cfg)  # a device this machine lacks fails before anything is written
    if resolution is not None and resolution < 16:
        raise Hi3DError(f"--resolution must be >= 16 pixels (got {resolution})")
    render_cfg = RenderConfig(num_views=16, resolution=resolution or QUALITY[quality][1])
    rec = RunRecord(out, "demo", config={"reconstruct": to_dict(cfg), "render": to_dict(render_cfg)},
                    seed=cfg.neus.seed)
    rec.add(object=str(source), quality=quality, num_interp=num_interp)
    orbit_dir = out / "orbit"
    with rec.stage("render") as entry:
        entry["skipped"] = (orbit_dir / "cameras.json").is_file()
        if not entry["skipped"]:
            save_orbit(render_orbit(source, render_cfg), orbit_dir)
    normalization = load_orbit(orbit_dir, load_depth=False).normalization.numpy()
    with rec.stage("reconstruct"):
        files = reconstruct(orbit_dir, out / "recon", num_interp, cfg, progress=progress)
    recon_stages = json.loads((out / "recon" / "run.json").read_text())["stages"]
    metrics = {"object": str(source), "num_interp": num_interp, "quality": quality}
    previous = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    with rec.stage("evaluate") as entry:  # skipped when the mesh was not remade and was scored already
        entry["skipped"] = recon_stages["mesh"]["skipped"] and all(previous.get(k) == v for k, v in metrics.items())
        if entry["skipped"]:
            metrics.update(chamfer=previous["chamfer"], volume_iou=previous["volume_iou"])
        else:
            pred = load_world_mesh(files["ply"], normalization)
            gt = load_world_mesh(source, normalization)
            metrics.update(chamfer=chamfer_distance(pred, gt), volume_iou=volume_iou(pred, gt))
        entry.update(metrics)
    metrics["stage_seconds"] = {"render": rec.data["stages"]["render"]["wall_time_s"],
                                **{k: v["wall_time_s"] for k, v in recon_stages.items()},
                                "evaluate": rec.data["stages"]["evaluate"]["wall_time_s"]}
    write_json(out / "metrics.json", metrics)
    rec.finish(metrics=metrics)
    return metrics


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hi3d demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    parser.add_argument("--object", default="bunny",
                        help=f"{' | '.join(REAL_OBJECTS)} | PATH to a mesh (default bunny)")
    parser.add_argument("--quality", choices=sorted(QUALITY), default="cpu",
                        help="cpu: minutes on a laptop CPU (configs/recon/neus.yaml); high: GPU (neus_high.yaml)")
    parser.add_argument("--num-interp", type=int, default=16, help="M interpolated views (0 = plain NeuS)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="orbit resolution in pixels (default 256 for cpu, 512 for high)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="overrides of the reconstruct config, e.g. neus.iterations=500")
    args = parser.parse_intermixed_args(argv)
    m = run_demo(Path(args.out), args.object, args.quality, args.num_interp, args.overrides, not args.no_progress,
                 args.resolution)
    print(f"{Path(m['object']).name}: Chamfer distance {m['chamfer']:.4f}, volume IoU {m['volume_iou']:.3f} "
          f"(unit cube, M = {m['num_interp']})")
    print("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in m["stage_seconds"].items()))
    print(f"mesh: {Path(args.out) / 'recon' / 'mesh.glb'} (+ .obj, .ply), turntable: "
          f"{Path(args.out) / 'recon' / 'turntable.png'}")
    return 0
