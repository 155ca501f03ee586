"""tests/suite.py, the suite's runner: its processes cover every test file once, and its exit status."""

import subprocess

from tests import suite


def test_groups_cover_every_test_file_once():
    groups = [*suite.GROUPS, suite.rest(suite.GROUPS)]
    files = sorted(p.relative_to(suite.ROOT).as_posix() for p in suite.TESTS.rglob("test_*.py"))
    assert files
    for f in files:
        owners = [paths for paths in groups if any(f == p or f.startswith(p + "/") for p in paths)]
        assert len(owners) == 1, (f, owners)
    assert "tests/engine" in suite.rest(suite.GROUPS) and "tests/test_readme.py" in suite.rest(suite.GROUPS)


def test_exit_status(monkeypatch, capsys):
    """The first failure's status; 5 only when no process collected a test; a path runs one process."""
    calls = []

    def fake(statuses):
        it = iter(statuses)

        def call(cmd, **kw):
            calls.append(cmd)
            return next(it)
        return call

    for statuses, want in (([0, 0, 0], 0), ([0, 5, 5], 0), ([5, 5, 5], 5), ([0, 1, 2], 1)):
        calls.clear()
        monkeypatch.setattr(subprocess, "call", fake(statuses))
        assert suite.run(["-m", "not slow"]) == want
        assert len(calls) == 3 and all(c[-1].startswith("tests/") and "not slow" in c for c in calls)
        summary = capsys.readouterr().out
        assert ("FAILED (exit status 1)" in summary) == (want == 1), summary
    calls.clear()
    monkeypatch.setattr(subprocess, "call", fake([3]))
    assert suite.run(["tests/engine/test_engine.py::test_x", "-x"]) == 3
    assert len(calls) == 1 and calls[0][-2:] == ["tests/engine/test_engine.py::test_x", "-x"]
