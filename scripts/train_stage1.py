"""Train the stage-1 orbit generator (paper §4.2) on the shared accelerate loop.

    accelerate launch scripts/train_stage1.py --config configs/stage1/paper.yaml data.root=DATA [--resume]
    python scripts/train_stage1.py --config configs/stage1/tiny_cpu.yaml data.root=DATA

``key=value`` overrides address ``model.*`` (``hi3d.models.stage1.Stage1Config``), ``data.*``
(``hi3d.data.datasets.DataConfig``) and ``train.*`` (``hi3d.training.loop.TrainConfig``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from hi3d.cli import add_config_args
from hi3d.config import load_config
from hi3d.data.datasets import DataConfig, build_dataset, first_samples
from hi3d.errors import ConfigError, Hi3DError
from hi3d.models.stage1 import Stage1Config, Stage1Task
from hi3d.training.loop import TrainConfig, train


@dataclasses.dataclass
class Stage1TrainConfig:
    model: Stage1Config = dataclasses.field(default_factory=Stage1Config)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    val_objects: int = 2
    """Validation grids condition on the first N objects of the dataset (0: no validation)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(Stage1TrainConfig, args.config, args.overrides + (["train.resume=true"] if args.resume else []))
        for key in ("num_frames", "resolution"):
            if getattr(cfg.data, key) != getattr(cfg.model, key):
                raise ConfigError(f"data.{key} ({getattr(cfg.data, key)}) differs from model.{key} "
                                  f"({getattr(cfg.model, key)}); set both to the same value")
        dataset = build_dataset(cfg.data)
        val = first_samples(dataset, cfg.val_objects) if cfg.val_objects > 0 else None
        train(cfg.train, Stage1Task(cfg.model), dataset, val, record_config=cfg, command="train_stage1")
    except Hi3DError as e:
        print(f"train_stage1: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
