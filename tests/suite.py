"""The whole test suite as a few pytest processes, one per group of test folders.

    python -m tests.suite                  # every test
    python -m tests.suite -m "not slow"    # the quick subset (any pytest option goes to every process)

Why not one process: the suite's one long process crashed at random places after 550-700 tests (CI and local
runs, 2026-11-30 to 12-01). A C++ exception thrown late in the run met an unwind-frame registration of XLA:CPU code
that had been freed (benchmarks/NOTES.md, "The crash, caught"), and which small change to what the suite compiles
decided whether it did. No process here runs more than ~370 tests, and none that compiles much more than ~250.
Two processes run at a time (SLORA_TEST_JOBS sets how many). On a 2-core CI machine the three took 954 s that
way (2026-12-01, a clean clone, 622 + 571 + 383 s each), against 1178 s one after another the same day.
Each process writes to a file of its own (its path printed at the start), printed whole when it ends, so the log
reads one group at a time; an interrupted run stops the processes and prints what they wrote. With -s or --pdb
one process runs at a time, on the terminal.
A path among the arguments runs one pytest process on what was asked, as `python -m pytest` would.
Exit status: the first failing process's status; 5 (pytest's "no tests collected") only if no process collected
any test; else 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
# Folders and files of each process; what no group names runs in a process of its own, started first. The
# kernels' ~250 tests compile the most; the servers' group's ~370 compile little of their own (the servers they
# test are processes of their own); the rest, ~250, build most of the engines. One more process costs ~10 s of
# start-up and whatever programs it compiles again. Started longest first (CI, 2026-12-01, alone: the rest 7.5,
# the servers' group 6.4, the kernels 5.7 minutes), so that two at a time end close together.
GROUPS = [
    ["tests/adapters", "tests/memory", "tests/training", "tests/server", "tests/clients", "tests/deploy"],
    ["tests/pallas_kernels"],
]
NO_TESTS = 5


def jobs() -> int:
    """How many pytest processes run at once: SLORA_TEST_JOBS, else 2 (at most the machine's cores, at least 1)."""
    raw = os.environ.get("SLORA_TEST_JOBS", "")
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise SystemExit(f"SLORA_TEST_JOBS must be a whole number of processes, got {raw!r}") from None
        if n < 1:
            raise SystemExit(f"SLORA_TEST_JOBS must be at least 1, got {n}")
        return n
    return max(1, min(2, len(os.sched_getaffinity(0))))


# Options under which pytest talks to the terminal (no capture, a debugger): one process at a time, its output live.
INTERACTIVE = ("-s", "--capture=no", "--pdb", "--trace")


def start(cmd: list[str], log) -> subprocess.Popen:
    """One pytest process, its output into `log`."""
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)


def rest(groups: list[list[str]]) -> list[str]:
    """The test folders and top-level test files under tests/ that no group names, sorted."""
    named = {p for g in groups for p in g}
    out = []
    for p in sorted(TESTS.iterdir()):
        rel = p.relative_to(ROOT).as_posix()
        if rel in named:
            continue
        if (p.is_dir() and any(p.rglob("test_*.py"))) or (p.is_file() and p.name.startswith("test_")
                                                          and p.suffix == ".py"):
            out.append(rel)
    return out


def run(args: list[str]) -> int:
    """Run the groups (or one process for explicit paths); returns the suite's exit status."""
    if any((ROOT / a.split("::")[0]).exists() for a in args if not a.startswith("-")):
        return subprocess.call([sys.executable, "-m", "pytest", "-q", *args], cwd=ROOT)
    # The rest first: it is the longest group.
    groups = [rest(GROUPS), *GROUPS]
    live = any(a in INTERACTIVE for a in args)
    width = 1 if live else jobs()
    waiting = list(range(len(groups)))
    running: dict[int, tuple[subprocess.Popen, object, float]] = {}
    results: dict[int, tuple[int, float]] = {}
    t_start = time.perf_counter()
    try:
        while waiting or running:
            while waiting and len(running) < width:
                i = waiting.pop(0)
                cmd = [sys.executable, "-m", "pytest", "-q", *args, *groups[i]]
                print(f"== started: {' '.join(groups[i])}", flush=True)
                if live:  # in the foreground, its output on the terminal
                    t0 = time.perf_counter()
                    results[i] = (subprocess.call(cmd, cwd=ROOT), time.perf_counter() - t0)
                    continue
                log = tempfile.NamedTemporaryFile(mode="w+b", prefix="slora-tests-", suffix=".log")
                print(f"   output: {log.name} (printed when it ends)", flush=True)
                running[i] = (start(cmd, log), log, time.perf_counter())
            done = [i for i, (proc, _, _) in running.items() if proc.poll() is not None]
            if not done:
                time.sleep(0.5)
                continue
            for i in done:
                proc, log, t0 = running.pop(i)
                results[i] = (proc.returncode, time.perf_counter() - t0)
                print(f"\n== {' '.join(groups[i])} (exit status {proc.returncode}, {results[i][1]:.0f} s)", flush=True)
                _print_log(log)
    finally:
        # Interrupted (Ctrl-C, a CI timeout) or failed: stop the processes still running, and show what they wrote.
        for i, (proc, log, _) in running.items():
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            print(f"\n== {' '.join(groups[i])} (stopped)", flush=True)
            _print_log(log)
    print(f"\n== the suite, {len(groups)} processes, {width} at a time: {time.perf_counter() - t_start:.0f} s")
    for i, paths in enumerate(groups):
        rc, dt = results[i]
        state = {0: "passed", NO_TESTS: "no tests collected"}.get(rc, f"FAILED (exit status {rc})")
        print(f"{dt:7.0f} s  {state:28s} {' '.join(paths)}")
    statuses = [results[i][0] for i in range(len(groups))]
    failed = [rc for rc in statuses if rc not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return NO_TESTS if all(rc == NO_TESTS for rc in statuses) else 0


def _print_log(log) -> None:
    log.flush()
    log.seek(0)
    sys.stdout.buffer.write(log.read())
    sys.stdout.flush()
    log.close()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
