"""Under ``CI=true`` a missing fixture (real mesh, shared data) fails the test and is named; locally it skips."""

import pytest

from hi3d.data.real_objects import REAL_OBJECTS


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


def test_ci_run_with_shared_data_removed_fails_and_lists_it(pytester, monkeypatch, tmp_path):
    """A whole pytest session (in process) with this suite's conftest as a plugin and no shared data."""
    import conftest

    monkeypatch.setattr(conftest, "MISSING_FIXTURES", set())  # the inner sessions' list, not this one's
    pytester.makepyfile(test_uses_shared="from conftest import shared_data\n\n\ndef test_keys():\n"
                                         "    assert shared_data('release-keys').is_dir()\n")
    empty = tmp_path / "no_shared"
    empty.mkdir()
    monkeypatch.setenv("HI3D_SHARED", str(empty))
    monkeypatch.setenv("CI", "true")
    ci = pytester.runpytest_inprocess("-p", "conftest", "-p", "no:cacheprovider", "-p", "no:xdist")
    ci.assert_outcomes(failed=1)
    ci.stdout.fnmatch_lines(["*missing fixtures (tests needing them failed: CI=true)*",
                             f"shared data release-keys missing under {empty}*"])
    monkeypatch.setenv("CI", "")
    local = pytester.runpytest_inprocess("-p", "conftest", "-p", "no:cacheprovider", "-p", "no:xdist")
    local.assert_outcomes(skipped=1)
