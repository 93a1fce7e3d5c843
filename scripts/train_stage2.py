"""Train the stage-2 refiner (paper §4.3) on the shared accelerate loop: ground-truth orbits are degraded
on the fly inside the training step (``hi3d.data.degradation``), their depth and per-frame latents condition
the UNet, the loss is on the clean frames.

    accelerate launch scripts/train_stage2.py --config configs/stage2/paper.yaml data.root=DATA [--resume]
    python scripts/train_stage2.py --config configs/stage2/tiny_cpu.yaml data.root=DATA

``key=value`` overrides address ``model.*`` (``hi3d.models.stage2.Stage2Config``, incl. ``model.depth.*`` and
``model.degradation.*``), ``data.*`` (``hi3d.data.datasets.DataConfig``) and ``train.*``
(``hi3d.training.loop.TrainConfig``).
"""

from __future__ import annotations

import dataclasses
import sys

from hi3d.data.datasets import DataConfig
from hi3d.models.stage2 import Stage2Config
from hi3d.training.loop import TrainConfig
from hi3d.training.script import run_training
from hi3d.training.stage2 import Stage2Task


@dataclasses.dataclass
class Stage2TrainConfig:
    model: Stage2Config = dataclasses.field(default_factory=Stage2Config)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    val_objects: int = 2
    """Validation grids refine degraded versions of the first N objects (0: no validation)."""


def main(argv: list[str] | None = None) -> int:
    return run_training(Stage2TrainConfig, Stage2Task, "train_stage2", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
