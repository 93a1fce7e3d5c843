"""The command-line body shared by ``scripts/train_stage1.py`` and ``scripts/train_stage2.py``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from hi3d.cli import add_config_args
from hi3d.config import load_config
from hi3d.data.datasets import build_dataset, first_samples
from hi3d.errors import ConfigError, Hi3DError
from hi3d.training.loop import train


def run_training(schema: type, make_task: Callable, name: str, doc: str, argv: list[str] | None = None) -> int:
    """Parse ``--config``, ``--resume`` and ``key=value`` into ``schema`` (sections ``model``, ``data``,
    ``train``, ``val_objects``), build the task with ``make_task(cfg.model)`` and train it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(schema, args.config, args.overrides + (["train.resume=true"] if args.resume else []))
        for key in ("num_frames", "resolution"):
            if getattr(cfg.data, key) != getattr(cfg.model, key):
                raise ConfigError(f"data.{key} ({getattr(cfg.data, key)}) differs from model.{key} "
                                  f"({getattr(cfg.model, key)}); set both to the same value")
        dataset = build_dataset(cfg.data)
        val = first_samples(dataset, cfg.val_objects) if cfg.val_objects > 0 else None
        train(cfg.train, make_task(cfg.model), dataset, val, record_config=cfg, command=name)
    except Hi3DError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    return 0
