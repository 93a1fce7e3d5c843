"""hi3d.parallel: the one sharding mechanism (``Shard``), and the ablation run on two real ``accelerate launch``
processes (the GSO one is in tests/test_gso.py, beside its fixtures)."""

import json
import multiprocessing
import runpy
import time
from pathlib import Path

import pytest
from conftest import accelerate_launch_two_cpu, real_object

from hi3d.errors import Hi3DError
from hi3d.io import read_json
from hi3d.parallel import Shard, child_env, file_lock, shard_indices

REPO = Path(__file__).resolve().parent.parent
FAST = ["--views", "gt", "--m", "0,4", "reconstructor=visual-hull", "reconstruct_overrides=[resolution=32]",
        "num_views=4", "resolution=48", "num_points=3000", "iou_resolution=32"]


def test_units_are_dealt_by_index_for_any_process_count(tmp_path):
    units = [f"u{i}" for i in range(11)]
    for world in (1, 2, 3, 8, 16):
        parts = [Shard(r, world).mine(units) for r in range(world)]
        assert sorted(sum(parts, [])) == sorted(units)  # a partition
        assert parts[0][0] == "u0" and all(Shard(r, world).owns(r) for r in range(world))
    assert shard_indices(7, 1, 3) == [1, 4]
    with pytest.raises(Hi3DError, match="out of range"):
        Shard(2, 2)
    one, two = Shard(0, 1), Shard(1, 2)
    assert one.run_filename() == "run.json" and two.run_filename() == "run-shard0001-of-0002.json"
    assert two.record(tmp_path / "r.json", {"object": "a"}) == {"object": "a", "process": 1}
    assert read_json(tmp_path / "r.json")["process"] == 1 and not list(tmp_path.glob(".*tmp*"))  # atomic
    two.log(tmp_path, "task", ran=["a"])
    assert two.read_logs(tmp_path, "task") == [{"process": 1, "world": 2, "ran": ["a"]}]  # rank 0 wrote none
    two.wait()  # a fixed split has no collective: returns at once


def test_child_env_leaves_the_group_and_pins_the_gpu():
    launched = {"PATH": "/bin", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x",
                "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    env = child_env(launched)
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "5"}
    assert child_env({**launched, "CUDA_VISIBLE_DEVICES": ""})["CUDA_VISIBLE_DEVICES"] == ""  # no GPU: none
    assert child_env({k: v for k, v in launched.items() if k != "CUDA_VISIBLE_DEVICES"})["CUDA_VISIBLE_DEVICES"] == "1"
    assert child_env({"PATH": "/bin"}) == {"PATH": "/bin"}  # not launched: unchanged


def _hold(path, lock, log, seconds):
    with file_lock(lock):
        with open(log, "a") as f:
            f.write(f"in {path}\n")
        time.sleep(seconds)
        with open(log, "a") as f:
            f.write(f"out {path}\n")


def test_file_lock_serialises_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")  # fast; the lock is a plain flock
    procs = [ctx.Process(target=_hold, args=(i, tmp_path / "x.lock", tmp_path / "log", 0.3)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    lines = (tmp_path / "log").read_text().split()
    assert [w for w in lines[::2]] == ["in", "out", "in", "out"]  # never both inside


def _table(out: Path) -> dict:
    """The numbers of an ablation run (rows without their process), its csv and markdown tables."""
    res = read_json(out / "ablation.json")
    rows = [{k: v for k, v in r.items() if k != "process"} for r in res["rows"]]
    return {"rows": rows, "summary": res["summary"], "failed": res["failed"],
            "csv": (out / "ablation.csv").read_text(), "md": (out / "ablation.md").read_text()}


def test_ablation_on_two_processes_matches_one_and_resumes_with_one(tmp_path):
    """`accelerate launch --num_processes 2 scripts/ablate_m.py` (gloo CPU processes) on two real objects x two
    M values: the same table as one process, the cells split between the two ranks; after losing the cells
    of rank 1 (and a half-written record), one process redoes exactly those."""
    objects = ",".join(str(real_object(n)) for n in ("wuson", "spider"))
    main = runpy.run_path(str(REPO / "scripts" / "ablate_m.py"))["main"]
    assert main(["--objects", objects, "--out", str(tmp_path / "one"), *FAST]) == 0
    two = tmp_path / "two"
    proc = accelerate_launch_two_cpu([str(REPO / "scripts" / "ablate_m.py"), "--objects", objects, "--out", str(two),
                                      *FAST], timeout=300)
    assert json.loads(proc.stdout)["failed"] == []  # printed once, by the main process
    reference = _table(tmp_path / "one")
    assert _table(two) == reference and len(reference["rows"]) == 4
    cells = {f"{o}/gt/s0/M{m}": two / o / "gt" / "s0" / f"M{m}" / "metrics.json" for o in ("Wuson", "spider") for m in (0, 4)}
    process = {name: read_json(path)["process"] for name, path in cells.items()}
    assert sorted(set(process.values())) == [0, 1]  # dealt by index: rank 0 has M0, rank 1 M4 of each object
    logs = {lg["process"]: lg for lg in Shard(0, 2).read_logs(two, "ablate-m")}
    assert sorted(logs) == [0, 1] and sorted(logs[0]["ran"] + logs[1]["ran"]) == sorted(cells)
    assert all(process[name] == rank for rank in (0, 1) for name in logs[rank]["ran"])
    assert (two / "run-shard0000-of-0002.json").is_file() and (two / "run-shard0001-of-0002.json").is_file()
    # rank 1 killed: its records gone (one left half-written as a temp file), the spider orbit cut short
    lost = [name for name, p in process.items() if p == 1]
    kept = {name: cells[name].stat().st_mtime_ns for name, p in process.items() if p == 0}
    for name in lost:
        cells[name].rename(cells[name].with_name(".metrics.json.cut.tmp.json"))
    (two / "spider" / "orbit" / "cameras.json").unlink()
    assert main(["--objects", objects, "--out", str(two), *FAST]) == 0  # one process now
    log = Shard(0, 1).read_logs(two, "ablate-m")[0]
    assert sorted(log["ran"]) == sorted(lost) and sorted(log["skipped"]) == sorted(kept)
    assert log["views_made"] == ["spider/gt/s0"]  # the cut orbit is rendered again, Wuson's kept
    assert {n: cells[n].stat().st_mtime_ns for n in kept} == kept  # finished cells untouched
    assert all(read_json(cells[n])["process"] == 0 for n in lost)
    assert _table(two) == reference
