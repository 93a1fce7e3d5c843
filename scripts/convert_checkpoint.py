"""Convert the official Hi3D stage-1 checkpoint (Stability generative-models state dict) into a diffusers-format
folder loadable by ``hi3d.pipelines.orbit.OrbitPipeline.from_pretrained``.

    python scripts/convert_checkpoint.py ckpts/first_stage.pt --out weights/hi3d-stage1 [--ema]
    python scripts/convert_checkpoint.py --stage 2 ckpts/second_stage.pt --out weights/hi3d-stage2
        (stage 2: ``hi3d/models/convert_stage2.py``, configs/stage2/{unet,depth}.json; the checkpoint's MiDaS
        DPT-Hybrid is converted too, ``--depth <transformers DPT folder>`` replaces it)

Logic and key tables: ``hi3d/models/convert.py``; architecture configs: ``configs/stage1/*.json``.
"""

import sys

from hi3d.errors import Hi3DError
from hi3d.models.convert import cli

if __name__ == "__main__":
    try:
        argv = sys.argv[1:]
        if argv[:2] == ["--stage", "2"]:
            from hi3d.models.convert_stage2 import cli as cli_stage2

            sys.exit(cli_stage2(argv[2:]))
        sys.exit(cli(argv[2:] if argv[:2] == ["--stage", "1"] else argv))
    except Hi3DError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        sys.exit(2)
