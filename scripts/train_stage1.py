"""Train the stage-1 orbit generator (paper §4.2) on the shared accelerate loop.

    accelerate launch scripts/train_stage1.py --config configs/stage1/paper.yaml data.root=DATA [--resume]
    python scripts/train_stage1.py --config configs/stage1/tiny_cpu.yaml data.root=DATA

``key=value`` overrides address ``model.*`` (``hi3d.models.stage1.Stage1Config``), ``data.*``
(``hi3d.data.datasets.DataConfig``) and ``train.*`` (``hi3d.training.loop.TrainConfig``).
"""

from __future__ import annotations

import dataclasses
import sys

from hi3d.data.datasets import DataConfig
from hi3d.models.stage1 import Stage1Config
from hi3d.training.loop import TrainConfig
from hi3d.training.script import run_training
from hi3d.training.stage1 import Stage1Task


@dataclasses.dataclass
class Stage1TrainConfig:
    model: Stage1Config = dataclasses.field(default_factory=Stage1Config)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    val_objects: int = 2
    """Validation grids condition on the first N objects of the dataset (0: no validation)."""


def main(argv: list[str] | None = None) -> int:
    return run_training(Stage1TrainConfig, Stage1Task, "train_stage1", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
