"""``run.json`` beside every command's outputs: config, seed, versions, git commit, weight hashes,
start/end time, per-stage wall time and peak memory. Written atomically after every stage."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hi3d.io import write_json
from hi3d.threads import record_cpu_threads

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "gsplat", "open_clip_torch", "trimesh",
            "pymcubes", "omegaconf", "numpy")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "hi3d": None}
    for name in ("hi3d",) + PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def git_commit() -> str | None:
    """Commit of the hi3d source tree (with ``+dirty`` if it has uncommitted changes), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_hashes(folder: str | Path, patterns=("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")) -> dict:
    """sha256 of every weight file under ``folder`` (relative path -> hash)."""
    folder = Path(folder)
    files = sorted({p for pat in patterns for p in folder.rglob(pat)})
    return {str(p.relative_to(folder)): file_sha256(p) for p in files}


def peak_memory_mb(device: torch.device | None = None) -> dict[str, float]:
    out = {"cpu_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device is not None and device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class RunRecord:
    """Collects what a run used and writes ``out_dir/run.json``.

    >>> rec = RunRecord(out, "render-orbit", config=cfg, seed=0)
    >>> with rec.stage("render"): ...
    >>> rec.finish()
    """

    def __init__(self, out_dir: str | Path, command: str, config: Any = None, seed: int | None = None,
                 device: torch.device | None = None, filename: str = "run.json"):
        from hi3d.config import to_dict

        self.path = Path(out_dir) / filename
        self.device = device
        previous = self._previous()
        self.data: dict[str, Any] = {
            "command": command,
            "argv": sys.argv,
            "config": to_dict(config) if config is not None and not isinstance(config, dict) else config,
            "seed": seed,
            "versions": versions(),
            "git_commit": git_commit(),
            "host": platform.node(),
            "start_time": _now(),
            "end_time": None,
            "stages": previous.get("stages", {}),
            "weights": {},
        }
        self.save()

    def _previous(self) -> dict:
        try:
            import json

            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def add(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def add_weights(self, folder: str | Path) -> None:
        self.data["weights"][str(folder)] = weight_hashes(folder)
        self.save()

    @contextlib.contextmanager
    def stage(self, name: str, device: torch.device | str | None = None) -> Iterator[dict]:
        """Time a stage; its entry (``device`` it ran on — default the record's —, ``wall_time_s``, peak memory,
        the CPU thread counts its steps used (``cpu_threads``, see ``hi3d.threads.record_cpu_threads``),
        anything the block adds) lands in run.json. ``device`` may also name a non-torch backend (``pyrender``)."""
        where = device if device is not None else self.device
        torch_device = where if isinstance(where, torch.device) else None
        if isinstance(where, str) and where.split(":")[0] in ("cpu", "cuda"):
            torch_device = torch.device(where)
        if torch_device is not None and torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(torch_device)
        entry: dict[str, Any] = {} if where is None else {"device": str(where)}
        start = time.perf_counter()
        with record_cpu_threads() as threads:
            yield entry
        if threads:
            entry["cpu_threads"] = threads
        entry.update(wall_time_s=round(time.perf_counter() - start, 3), **peak_memory_mb(torch_device))
        self.data["stages"][name] = entry
        self.save()

    def finish(self, **fields: Any) -> None:
        self.data.update(fields, end_time=_now())
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)
