"""Crash-safe training checkpoints: ``OUT/checkpoints/step-00000800/`` appears only when complete.

Every process writes into ``OUT/checkpoints/.tmp-step-00000800/`` (``accelerator.save_state``: model,
optimizer, grad scaler, registered objects such as the lr scheduler and EMA, per-process RNG states;
plus ``train_state_<rank>.pt``: this process's training generator and data position); after a barrier the
main process renames the folder to its final name (an atomic rename on one filesystem; multi-node runs
need the output folder on a shared filesystem) and deletes all but the newest ``keep_last``. A crash
mid-save leaves a ``.tmp-*`` folder, which is ignored and cleared by the next save of that step.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from hi3d.errors import Hi3DError

_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    m = _NAME.match(Path(path).name)
    if not m:
        raise Hi3DError(f"{path} is not a checkpoint folder (expected checkpoints/step-NNNNNNNN)")
    return int(m.group(1))


def save_checkpoint(accelerator, out_dir: str | Path, step: int, process_state: dict, keep_last: int,
                    hook: Callable[[str, Path], None] | None = None) -> Path:
    """Write the checkpoint of ``step`` (module docstring); every process must call it.

    ``process_state``: this process's extra state (saved as ``train_state_<rank>.pt``). ``hook(stage,
    tmp_dir)`` is called after each part is written (``"accelerate"``, ``"process"``) — tests use it to
    simulate a crash mid-save.
    """
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(".tmp-" + final.name)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if hook:
        hook("accelerate", tmp)
    torch.save(process_state, tmp / f"train_state_{accelerator.process_index}.pt")
    if hook:
        hook("process", tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # same step saved before (e.g. re-run after finishing): keep the old one
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict | None:
    """Restore everything ``save_checkpoint`` wrote; returns this process's ``process_state`` (None when the
    checkpoint was written by fewer processes than now run)."""
    path = Path(path)
    if not path.is_dir():
        raise Hi3DError(f"checkpoint {path} does not exist")
    accelerator.load_state(str(path))
    own = path / f"train_state_{accelerator.process_index}.pt"
    return torch.load(own, weights_only=False) if own.is_file() else None
