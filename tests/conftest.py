import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per test worker (scripts/run_tests.sh runs two)

# Loading triton's LLVM after Mesa's EGL (llvmpipe) has loaded its own segfaults the process; torch imports
# triton lazily (torch._dynamo, e.g. from torch.optim), so import it before any test renders.
import torch._dynamo  # noqa: E402,F401

from hi3d.data.real_objects import REAL_OBJECTS  # noqa: E402


def real_object(name: str) -> Path:
    """Path of a real mesh made by others (Debian packages installed by scripts/bootstrap.sh), or skip."""
    path, package = REAL_OBJECTS[name]
    if not Path(path).is_file():
        pytest.skip(f"real object {name} missing: apt-get install {package}")
    return Path(path)


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
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
