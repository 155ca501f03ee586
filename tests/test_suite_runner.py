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


class _Done:
    """A finished pytest process, as `suite.start` returns it."""

    def __init__(self, rc, log, text):
        self.returncode = rc
        log.write(text.encode())

    def poll(self):
        return self.returncode


def test_exit_status(monkeypatch, capsys):
    """The first failure's status; 5 only when no process collected a test; a path runs one process."""
    calls = []

    def fake(statuses):
        it = iter(statuses)

        def start(cmd, log):
            calls.append(cmd)
            return _Done(next(it), log, f"output of {cmd[-1]}\n")
        return start

    for statuses, want in (([0, 0, 0], 0), ([0, 5, 5], 0), ([5, 5, 5], 5), ([0, 1, 2], 1)):
        calls.clear()
        monkeypatch.setattr(suite, "start", fake(statuses))
        assert suite.run(["-m", "not slow"]) == want
        assert len(calls) == 3 and all(c[-1].startswith("tests/") and "not slow" in c for c in calls)
        summary = capsys.readouterr().out
        assert ("FAILED (exit status 1)" in summary) == (want == 1), summary
        # Every process's own output is printed.
        assert all(f"output of {c[-1]}" in summary for c in calls), summary
    calls.clear()
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 3)
    assert suite.run(["tests/engine/test_engine.py::test_x", "-x"]) == 3
    assert len(calls) == 1 and calls[0][-2:] == ["tests/engine/test_engine.py::test_x", "-x"]


def test_jobs(monkeypatch):
    monkeypatch.setenv("SLORA_TEST_JOBS", "3")
    assert suite.jobs() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("SLORA_TEST_JOBS", bad)
        try:
            suite.jobs()
        except SystemExit as e:
            assert "SLORA_TEST_JOBS" in str(e)
        else:
            raise AssertionError(bad)
    monkeypatch.delenv("SLORA_TEST_JOBS")
    assert 1 <= suite.jobs() <= 2


def test_processes_run_side_by_side(monkeypatch, capsys):
    """With two at a time, the third process starts only once one of the first two has ended."""
    events = []

    class Slow:
        def __init__(self, name):
            self.name, self.polls, self.returncode = name, 0, None

        def poll(self):
            self.polls += 1
            if self.polls >= 2:
                if self.returncode is None:
                    events.append(("end", self.name))
                self.returncode = 0
            return self.returncode

    monkeypatch.setenv("SLORA_TEST_JOBS", "2")
    monkeypatch.setattr(suite.time, "sleep", lambda s: None)

    def start(cmd, log):
        events.append(("start", cmd[-1]))
        return Slow(cmd[-1])
    monkeypatch.setattr(suite, "start", start)
    assert suite.run([]) == 0
    starts = [i for i, e in enumerate(events) if e[0] == "start"]
    ends = [i for i, e in enumerate(events) if e[0] == "end"]
    assert starts[:2] == [0, 1] and starts[2] > ends[0], events


def test_an_interrupted_run_stops_its_processes_and_shows_their_output(monkeypatch, capsys):
    """Ctrl-C (or a CI timeout) while processes run: each is terminated and what it wrote so far is printed."""
    procs = []

    class Running:
        returncode = None

        def __init__(self, log):
            log.write(b"partial output\n")
            self.stopped = False

        def poll(self):
            return None

        def terminate(self):
            self.stopped = True

        def wait(self, timeout=None):
            return 0

    def start(cmd, log):
        procs.append(Running(log))
        return procs[-1]

    def sleep(_):
        raise KeyboardInterrupt

    monkeypatch.setenv("SLORA_TEST_JOBS", "2")
    monkeypatch.setattr(suite, "start", start)
    monkeypatch.setattr(suite.time, "sleep", sleep)
    try:
        suite.run([])
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt was swallowed")
    out = capsys.readouterr().out
    assert len(procs) == 2 and all(p.stopped for p in procs)
    assert out.count("partial output") == 2 and out.count("(stopped)") == 2


def test_interactive_options_run_one_process_at_a_time_in_the_foreground(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)

    def start(cmd, log):
        raise AssertionError("started a background process")

    monkeypatch.setattr(suite, "start", start)
    assert suite.run(["-s", "-m", "not slow"]) == 0
    assert len(calls) == 3 and all("-s" in c for c in calls)
