"""Convert the official Hi3D stage-1 checkpoint (Stability generative-models state dict) into a diffusers-format
folder loadable by ``hi3d.pipelines.orbit.OrbitPipeline.from_pretrained``.

    python scripts/convert_checkpoint.py ckpts/first_stage.pt --out weights/hi3d-stage1 [--ema]

Logic and key tables: ``hi3d/models/convert.py``; architecture configs: ``configs/stage1/*.json``.
"""

import sys

from hi3d.errors import Hi3DError
from hi3d.models.convert import cli

if __name__ == "__main__":
    try:
        sys.exit(cli(sys.argv[1:]))
    except Hi3DError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        sys.exit(2)
