"""Score a method on the GSO protocol: ``python scripts/eval_gso.py --gso-root GSO --pred PRED --out OUT``.

    accelerate launch --num_processes 8 scripts/eval_gso.py ...   # objects dealt across 8 processes (GPUs)

Any ``GSOConfig`` field can be given as ``key=value`` (or in ``--config YAML``); see ``hi3d/eval/gso.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from hi3d.cli import add_config_args
from hi3d.config import load_config
from hi3d.errors import Hi3DError
from hi3d.eval.gso import GSOConfig, run_gso


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GSO evaluation: render GT, run/read predictions, score, write tables")
    p.add_argument("--gso-root", help="folder of <object>/meshes/model.obj")
    p.add_argument("--pred", help="predictions folder (<pred>/<object>/mesh.* and/or views/) for method=folder")
    p.add_argument("--objects", help="object list file or comma-separated names")
    p.add_argument("--out", help="output folder")
    p.add_argument("--method", help="'folder', a registered name, or package.module:factory")
    add_config_args(p)
    args = p.parse_args(argv)
    overrides = [f"{k}={v}" for k, v in [("gso_root", args.gso_root), ("pred_dir", args.pred),
                                         ("objects", args.objects), ("out", args.out), ("method", args.method)]
                 if v is not None] + list(args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        result = run_gso(load_config(GSOConfig, args.config, overrides))
    except Hi3DError as e:
        print(f"eval_gso: error: {e}", file=sys.stderr)
        return 2
    if result["process"] == 0:  # under accelerate launch the main process reports the merged tables
        print(json.dumps({"mean": result["mean"], "failed": result["failed"], "skipped": result["skipped"]}, indent=2))
    return 1 if result["failed"] and not result["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
