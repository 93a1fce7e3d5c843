"""Orbit datasets: many local assets -> ``OUT/<object id>/`` orbit folders (layout of ``hi3d.data.orbit``).

Sharded (object i goes to shard ``i % num_shards`` of the sorted list, ``hi3d.parallel``), resumable (an object whose
``cameras.json`` is complete is skipped; a partial folder is deleted and redone), with
``OUT/manifest.jsonl`` (one JSON line per processed object: id, source, elevation_deg, status) and
``OUT/errors/<id>.log`` for objects that failed: one broken asset never stops the run.
The elevation of each object is drawn from ``(seed, object id)``, so it does not depend on sharding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import traceback
from pathlib import Path

from hi3d.data.mesh_io import SUPPORTED
from hi3d.data.orbit import save_orbit
from hi3d.data.render import RenderConfig, render_orbit, resolve_elevation
from hi3d.errors import Hi3DError
from hi3d.io import read_json, write_bytes
from hi3d.parallel import shard_indices


def list_assets(source: str | Path) -> list[Path]:
    """Mesh files under a folder (recursive, sorted) or listed in a text file (one path a line, ``#``
    comments, relative paths taken from the list's folder)."""
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
    if source.is_file():
        lines = [ln.strip() for ln in source.read_text().splitlines()]
        paths = [Path(ln) for ln in lines if ln and not ln.startswith("#")]
        return [p if p.is_absolute() else source.parent / p for p in paths]
    raise Hi3DError(f"asset source not found: {source} (give a folder of meshes or a text file listing them)")


def object_ids(assets: list[Path]) -> list[str]:
    """One folder name per asset: the file stem (Objaverse uid), or the path joined by ``__`` when stems collide."""
    stems = [p.stem for p in assets]
    dup = {s for s in stems if stems.count(s) > 1}
    return [("__".join(p.with_suffix("").parts[-3:]) if p.stem in dup else p.stem) for p in assets]


def object_seed(seed: int, object_id: str) -> int:
    """Seed of one object, a pure function of the run seed and the object id."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{object_id}".encode()).digest()[:4], "little")


def is_complete(obj_dir: Path, num_views: int) -> bool:
    """True when ``obj_dir/cameras.json`` (written last by ``save_orbit``) lists ``num_views`` existing views."""
    try:
        frames = read_json(obj_dir / "cameras.json")["frames"]
    except (OSError, ValueError, KeyError):
        return False
    return len(frames) == num_views and all((obj_dir / f["file"]).is_file() for f in frames)


def _append_line(path: Path, record: dict) -> None:
    """Append one JSON line with a single write (atomic for short lines, safe across shard processes)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _manifest_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if rec.get("status") == "ok":
            ids.add(rec["id"])
    return ids


def build_dataset(assets: list[Path], out_dir: str | Path, cfg: RenderConfig, seed: int = 0, shard: int = 0,
                  num_shards: int = 1, log=print) -> dict[str, int]:
    """Render this shard's assets into ``out_dir``; returns counts ``{"done", "skipped", "failed"}``.

    Each object gets ``cfg`` with ``seed = object_seed(seed, id)`` (its random elevation when
    ``cfg.random_elevation``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    listed = _manifest_ids(manifest)
    ids = object_ids(assets)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for i in shard_indices(len(assets), shard, num_shards):
        oid, path, obj_dir = ids[i], assets[i], out / ids[i]
        if is_complete(obj_dir, cfg.num_views):
            counts["skipped"] += 1
            if oid not in listed:  # finished before a crash cut its manifest line
                elevation = read_json(obj_dir / "cameras.json")["frames"][0]["elevation_deg"]
                _append_line(manifest, {"id": oid, "source": str(path), "elevation_deg": elevation, "status": "ok"})
            continue
        if obj_dir.exists():
            shutil.rmtree(obj_dir)  # partial output of an interrupted run
        obj_cfg = dataclasses.replace(cfg, seed=object_seed(seed, oid))
        elevation = resolve_elevation(obj_cfg)
        start = time.perf_counter()
        try:
            save_orbit(render_orbit(path, obj_cfg), obj_dir, sheet=cfg.contact_sheet,
                       extra={"object_id": oid, "source": str(path)})
        except Exception as e:  # noqa: BLE001 - any broken asset is logged, the run goes on
            counts["failed"] += 1
            shutil.rmtree(obj_dir, ignore_errors=True)
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            tb = "" if isinstance(e, Hi3DError) else traceback.format_exc()
            write_bytes(out / "errors" / f"{oid}.log", f"{path}\n{type(e).__name__}: {message}\n{tb}".encode())
            _append_line(manifest, {"id": oid, "source": str(path), "elevation_deg": elevation, "status": "error",
                                    "error": message})
            log(f"[{shard}/{num_shards}] FAILED {oid}: {message}")
            continue
        counts["done"] += 1
        (out / "errors" / f"{oid}.log").unlink(missing_ok=True)  # a failure of an earlier run, now fixed
        _append_line(manifest, {"id": oid, "source": str(path), "elevation_deg": elevation, "status": "ok",
                                "seconds": round(time.perf_counter() - start, 2)})
        log(f"[{shard}/{num_shards}] {oid}: {cfg.num_views} views at elevation {elevation:.1f}")
    return counts
