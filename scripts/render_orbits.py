#!/usr/bin/env python
"""Render a list of local assets (a folder or a text file of paths) into an orbit dataset.

    python scripts/render_orbits.py ASSETS --out DATA [--shard i --num-shards n] [--seed 0] [key=value ...]
    accelerate launch --num_processes 4 scripts/render_orbits.py ASSETS --out DATA   # one shard per process

Config keys are those of ``hi3d.data.render.RenderConfig`` (elevation random in [-10, 40] by default).
Re-running the same command resumes; see ``hi3d.data.dataset_builder`` for the output layout.
"""

from __future__ import annotations

import argparse
import sys

from hi3d.cli import add_config_args
from hi3d.config import load_config
from hi3d.data.dataset_builder import build_dataset, list_assets
from hi3d.data.render import RenderConfig
from hi3d.errors import Hi3DError
from hi3d.parallel import Shard
from hi3d.provenance import RunRecord


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("assets", help="folder of meshes (searched recursively) or text file with one path a line")
    p.add_argument("--out", required=True)
    p.add_argument("--shard", type=int, default=None, help="this shard's index (default: accelerate process index)")
    p.add_argument("--num-shards", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="run seed; each object's elevation comes from (seed, id)")
    add_config_args(p)
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(RenderConfig, args.config, ["random_elevation=true", *args.overrides])
        # --shard given: a fixed split run by hand; else this process of `accelerate launch` (gloo, CPU)
        shard = Shard(cpu=True) if args.shard is None else Shard(args.shard, args.num_shards or 1)
        assets = list_assets(args.assets)
        rec = RunRecord(args.out, "render_orbits", config=cfg, seed=args.seed, filename=shard.run_filename())
        with rec.stage("render") as entry:
            entry.update(build_dataset(assets, args.out, cfg, args.seed, shard.rank, shard.world), assets=len(assets))
        rec.finish()
    except Hi3DError as e:
        print(f"render_orbits: error: {e}", file=sys.stderr)
        return 2
    print(f"shard {shard.rank}/{shard.world}: {entry}", file=sys.stderr)
    return 1 if entry["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
