import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per test worker (scripts/run_tests.sh runs two)

# Loading triton's LLVM after Mesa's EGL (llvmpipe) has loaded its own segfaults the process; torch imports
# triton lazily (torch._dynamo, e.g. from torch.optim), so import it before any test renders.
import torch._dynamo  # noqa: E402,F401

from hi3d.data.real_objects import REAL_OBJECTS  # noqa: E402

pytest_plugins = ["pytester"]  # tests/test_ci_fixtures.py runs whole pytest sessions


def accelerate_launch_two_cpu(args: list[str], timeout: int, check: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 ARGS`` with ACCELERATE_USE_CPU=1 (two gloo processes;
    ``--cpu --num_processes 2`` alone starts one unless MPI is installed), from the repository root."""
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


MISSING = "missing fixture: "
MISSING_FIXTURES: set[str] = set()  # collected from test reports (in the xdist controller too), listed at the end


def in_ci() -> bool:
    """``CI`` set to true/1/yes: fixtures the tests need must be there (``.ci/run``, CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_fixture(message: str):
    """A fixture (real mesh, shared data, installed script) is absent: skip locally, fail under ``CI=true``,
    so CI cannot pass by skipping what it was meant to check."""
    if in_ci():
        pytest.fail(f"{MISSING}{message} (CI=true: a missing fixture fails)", pytrace=False)
    pytest.skip(f"{MISSING}{message}")


def real_object(name: str) -> Path:
    """Path of a real mesh made by others (Debian packages installed by scripts/bootstrap.sh); skip if it
    is missing (fail under ``CI=true``)."""
    path, package = REAL_OBJECTS[name]
    if not Path(path).is_file():
        missing_fixture(f"real object {name} ({path}) missing: apt-get install {package}")
    return Path(path)


def shared_data(relative: str) -> Path:
    """A file or folder of the shared read-only data (``$HI3D_SHARED``, else ``<repo>/../shared``); skip if it
    is missing (fail under ``CI=true``)."""
    root = Path(os.environ.get("HI3D_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
    path = root / relative
    if not path.exists():
        missing_fixture(f"shared data {relative} missing under {root} (set HI3D_SHARED to the shared data folder)")
    return path


@pytest.fixture
def bunny_path() -> Path:
    return real_object("bunny")


@pytest.fixture
def spider_path() -> Path:
    return real_object("spider")


@pytest.fixture
def wuson_path() -> Path:
    return real_object("wuson")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `in item.keywords`: that holds path parts (a folder named gpu)
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    text = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr or "")
    if MISSING in text:
        MISSING_FIXTURES.add(text.split(MISSING, 1)[1].split(" (CI=true")[0].strip())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if MISSING_FIXTURES:
        verdict = "failed: CI=true" if in_ci() else "skipped; under CI=true they fail"
        terminalreporter.section(f"missing fixtures (tests needing them {verdict})")
        for message in sorted(MISSING_FIXTURES):
            terminalreporter.line(message)
