"""Pack orbit folders into tar shards for ``hi3d.data.datasets.ShardOrbitDataset``.

    python scripts/make_shards.py ORBITS_ROOT --out SHARDS_DIR [--objects-per-shard 256] [--seed 0]

Objects are shuffled (seeded) before packing so each shard mixes the dataset; shards are written
atomically as ``shard-000000.tar`` ...; re-running skips shards that already exist (resume).
``index.json`` lists shards and their object counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hi3d.data.datasets import find_orbits, seed_of, write_shard
from hi3d.errors import Hi3DError
from hi3d.io import atomic_path, write_json


def make_shards(root: Path, out: Path, per_shard: int, seed: int) -> dict:
    folders = find_orbits(root)
    g = torch.Generator().manual_seed(seed_of(seed, "make_shards"))
    folders = [folders[i] for i in torch.randperm(len(folders), generator=g).tolist()]
    shards = []
    for s, start in enumerate(range(0, len(folders), per_shard)):
        part = folders[start:start + per_shard]
        path = out / f"shard-{s:06d}.tar"
        if not path.exists():
            with atomic_path(path) as tmp:
                write_shard(tmp, part, root)
        shards.append({"file": path.name, "objects": len(part)})
    index = {"root": str(root), "seed": seed, "objects": len(folders), "shards": shards}
    write_json(out / "index.json", index)
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="folder of orbit folders (each with cameras.json)")
    p.add_argument("--out", type=Path, required=True, help="output folder for shard-*.tar")
    p.add_argument("--objects-per-shard", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        index = make_shards(args.root, args.out, args.objects_per_shard, args.seed)
    except Hi3DError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(f"{index['objects']} objects -> {len(index['shards'])} shards in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
