"""The one way the before/after benchmarks get a source tree at a git revision: ``git archive`` into a
temporary folder (no worktree to register or clean up), and a label for the working tree."""

from __future__ import annotations

import contextlib
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def source_tree(rev: str) -> Iterator[Path]:
    """Yields a temporary folder holding the repository's files at ``rev``; removed on exit."""
    with tempfile.TemporaryDirectory(prefix=f"hi3d-{rev[:12]}-") as tmp:
        archive = Path(tmp) / "tree.tar"
        archive.write_bytes(subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout)
        tree = Path(tmp) / "tree"
        with tarfile.open(archive) as tar:
            tar.extractall(tree, filter="data")
        archive.unlink()
        yield tree


def describe(rev: str = "HEAD") -> str:
    """Short commit of ``rev``; for HEAD with uncommitted changes to tracked files, ``<commit>+changes``."""
    dirty = rev == "HEAD" and git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", rev) + ("+changes" if dirty else "")
