"""Work split across the processes of ``accelerate launch``: the one mechanism of every batch command
(dataset rendering ``scripts/render_orbits.py``, batch generation ``hi3d generate FOLDER``, the GSO evaluation
``scripts/eval_gso.py`` and the ablations ``scripts/ablate_m.py``).

    shard = Shard()                          # rank / world from accelerate (gloo CPU processes without CUDA)
    for unit in shard.mine(units):           # unit i belongs to rank i % world: any process count works
        if finished(unit): continue          # a record whose fingerprint matches: skipped on re-runs
        ...                                  # shared work (several units of one object): `with shard.lock(p):`
        shard.record(path, row)              # atomic; "process": the rank that ran it
    shard.log(out, "task", ran=..., skipped=...)
    shard.wait()                             # every process has finished its units
    if shard.is_main: merge the records from disk into the tables

Each unit is written atomically as it finishes, so a killed process loses only the unit it was running: a
re-run (with any number of processes) skips the finished units and redoes the missing ones. Units are
dealt by their index in the full, deterministic list, so every process agrees on the split without talking.
The barrier (``wait``) is the only collective; its process group is made with a long timeout
(``HI3D_SHARD_TIMEOUT_S``, default 7 days), since ranks finish their shares hours apart at cluster scale.
Child processes (``hi3d generate`` / ``hi3d reconstruct`` run per unit) get ``child_env()``: the launch's
distributed variables removed, the parent's GPU pinned.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hi3d.errors import Hi3DError
from hi3d.io import read_json, write_json

T = TypeVar("T")

TIMEOUT_ENV = "HI3D_SHARD_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 7 * 24 * 3600
# set by torch.distributed.run / accelerate launch for each worker; a child process must not inherit them
DISTRIBUTED_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
                    "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def shard_indices(count: int, rank: int, world: int) -> list[int]:
    """Indices of ``range(count)`` that belong to ``rank`` of ``world`` (round robin; the ranks partition it)."""
    if world < 1 or not 0 <= rank < world:
        raise Hi3DError(f"shard {rank} out of range for {world} shards")
    return list(range(rank, count, world))


class Shard:
    """This process's share of a batch: rank ``rank`` of ``world``.

    ``Shard()`` takes both from ``accelerate.PartialState`` (one GPU per process; ``cpu=True``, or no CUDA:
    gloo CPU processes); ``Shard(rank, world)`` is a fixed split (``--shard i --num-shards n`` run by hand,
    no collective: ``wait`` returns at once)."""

    def __init__(self, rank: int | None = None, world: int | None = None, cpu: bool | None = None):
        self.state = None
        if rank is None:
            import torch
            from accelerate import PartialState

            cpu = (not torch.cuda.is_available()) if cpu is None else cpu
            timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
            self.state = PartialState(cpu=cpu, timeout=timeout)
            self.rank, self.world, self.device = self.state.process_index, self.state.num_processes, self.state.device
        else:
            self.rank, self.world = int(rank), int(1 if world is None else world)
            shard_indices(0, self.rank, self.world)  # range check
            import torch

            self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Shard({self.rank}/{self.world})"

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def indices(self, count: int) -> list[int]:
        return shard_indices(count, self.rank, self.world)

    def mine(self, units: Sequence[T]) -> list[T]:
        """The units of this process: ``units[i]`` for ``i % world == rank``."""
        return [units[i] for i in self.indices(len(units))]

    def wait(self) -> None:
        """Barrier: returns when every process of the launch has called it."""
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()

    def lock(self, path: str | Path) -> contextlib.AbstractContextManager[None]:
        return file_lock(path)

    def record(self, path: str | Path, record: dict[str, Any]) -> dict[str, Any]:
        """Write one unit's record atomically, with ``"process"``: this rank; returns it."""
        record = {**record, "process": self.rank}
        write_json(path, record)
        return record

    def run_filename(self, base: str = "run.json") -> str:
        """``run.json`` with one process, ``run-shard<rank>-of-<world>.json`` per process otherwise."""
        if self.world == 1:
            return base
        stem, dot, suffix = base.rpartition(".")
        return f"{stem}-shard{self.rank:04d}-of-{self.world:04d}{dot}{suffix}"

    def log_path(self, out: str | Path, task: str, rank: int | None = None) -> Path:
        rank = self.rank if rank is None else rank
        return Path(out) / "shards" / f"{task}-shard{rank:04d}-of-{self.world:04d}.json"

    def log(self, out: str | Path, task: str, **entry: Any) -> None:
        """This process's account of its share (units run, skipped, failed), in ``<out>/shards/``."""
        write_json(self.log_path(out, task), {"process": self.rank, "world": self.world, **entry})

    def read_logs(self, out: str | Path, task: str) -> list[dict[str, Any]]:
        """Every process's ``log`` of this launch (after ``wait``), rank order; a missing one is skipped."""
        paths = [self.log_path(out, task, r) for r in range(self.world)]
        return [read_json(p) for p in paths if p.is_file()]


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Exclusive lock on the file ``path`` (created; ``flock``: across the processes of one machine, and of
    several on shared file systems that support it, as NFSv4 does) for work several units share: the first
    process does it, the others wait, then find it done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def child_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process of a launched worker: without the launch's distributed variables (the
    child is a single process, not a new member of the group) and, under a launch, pinned to this worker's
    GPU (``CUDA_VISIBLE_DEVICES`` = the ``LOCAL_RANK``-th visible device), so 8 workers' children use 8 GPUs."""
    env = dict(os.environ if environ is None else environ)
    local_rank = env.get("LOCAL_RANK")
    if local_rank is not None and int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1"))) > 1:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if visible or "CUDA_VISIBLE_DEVICES" not in env:
            index = int(local_rank)
            env["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
    for key in DISTRIBUTED_VARS:
        env.pop(key, None)
    return env
