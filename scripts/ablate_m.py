"""M ablation (paper Table 4) and stage-2 ablations (Table 3):

    python scripts/ablate_m.py --objects a.obj,b.ply --views gt [--m 0,8,16,32,48] [--seeds 0,1,2]
    python scripts/ablate_m.py --objects bunny.obj --views generated generator=perturbed perturb.strength=0.5
    python scripts/ablate_m.py --objects bunny.obj --views generated generator=hi3d weights=DIR --stage2 full,none
    accelerate launch --num_processes 8 scripts/ablate_m.py ...   # cells dealt across 8 processes (GPUs)

Any ``AblationConfig`` field can be given as ``key=value`` (or in ``--config YAML``); see ``hi3d/eval/ablation.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from hi3d.cli import add_config_args
from hi3d.config import load_config
from hi3d.errors import Hi3DError
from hi3d.eval.ablation import AblationConfig, run_ablation


def _list(value: str) -> str:
    return "[" + ",".join(v.strip() for v in value.split(",")) + "]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="reconstruct objects for several M (and stage-2 modes, seeds) and score them")
    p.add_argument("--objects", help="comma-separated mesh files, or GSO names with --gso-root")
    p.add_argument("--gso-root", help="GSO folder (<name>/meshes/model.obj)")
    p.add_argument("--m", help="comma-separated M values (default 0,8,16,32,48)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0): mean ± spread over seeds per cell")
    p.add_argument("--views", choices=["gt", "generated"], help="reconstruct from GT orbits or generated views")
    p.add_argument("--stage2", help="comma-separated of full | none | no_depth | bicubic | realesrgan (views = generated)")
    p.add_argument("--out", help="output folder")
    add_config_args(p)
    args = p.parse_intermixed_args(argv)
    lists = {"objects": args.objects, "m_values": args.m, "seeds": args.seeds, "stage2": args.stage2}
    overrides = [f"{k}={_list(v)}" for k, v in lists.items() if v is not None]
    overrides += [f"{k}={v}" for k, v in [("gso_root", args.gso_root), ("views", args.views), ("out", args.out)]
                  if v is not None]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        result = run_ablation(load_config(AblationConfig, args.config, overrides + list(args.overrides)))
    except Hi3DError as e:
        print(f"ablate_m: error: {e}", file=sys.stderr)
        return 2
    if result["process"] == 0:  # under accelerate launch the main process reports the merged tables
        print(json.dumps({"summary": result["summary"], "failed": result["failed"]}, indent=2))
    return 1 if result["failed"] and not result["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
