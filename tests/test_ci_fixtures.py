"""Under ``CI=true`` a missing fixture (real mesh, shared data) fails the test and is named; locally it skips."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hi3d.data.real_objects import REAL_OBJECTS

TESTS = Path(__file__).resolve().parent


def test_missing_real_object_fails_under_ci_and_names_the_package(monkeypatch, tmp_path):
    from conftest import real_object

    monkeypatch.setitem(REAL_OBJECTS, "bunny", (str(tmp_path / "gone" / "bunny.obj"), "glmark2-data"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"real object bunny .*gone/bunny.obj.* apt-get install glmark2-data"):
        real_object("bunny")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="apt-get install glmark2-data"):
        real_object("bunny")
    monkeypatch.delitem(REAL_OBJECTS, "bunny")
    monkeypatch.setenv("CI", "true")
    assert real_object("spider").is_file()  # present fixtures are returned as before


def run_pytest(test_file: Path, **env) -> subprocess.CompletedProcess:
    """pytest on ``test_file`` with this suite's conftest as a plugin, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-q", "-c", os.devnull, "--rootdir", str(test_file.parent), str(test_file)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_ci_run_with_shared_data_removed_fails_and_lists_it(tmp_path):
    test = tmp_path / "test_uses_shared.py"
    test.write_text("from conftest import shared_data\n\n\ndef test_keys():\n"
                    "    assert shared_data('release-keys').is_dir()\n")
    empty = tmp_path / "no_shared"
    empty.mkdir()
    ci = run_pytest(test, CI="true", HI3D_SHARED=str(empty))
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "1 failed" in ci.stdout and "missing fixtures (tests needing them failed: CI=true)" in ci.stdout
    assert f"shared data release-keys missing under {empty}" in ci.stdout
    local = run_pytest(test, CI="", HI3D_SHARED=str(empty))
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout[-2000:]
