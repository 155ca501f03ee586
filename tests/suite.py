"""The whole test suite as a few pytest processes, one per group of test folders.

    python -m tests.suite                  # every test
    python -m tests.suite -m "not slow"    # the quick subset (any pytest option goes to every process)

Why not one process: the suite's one long process crashed at random places after 550-700 tests (CI and local
runs, 2026-11-30 to 12-01). A C++ exception thrown late in the run met an unwind-frame registration of XLA:CPU code
that had been freed (benchmarks/NOTES.md, "The crash, caught"), and which small change to what the suite compiles
decided whether it did. No process here runs more than ~370 tests, and none that compiles much more than ~250.
A path among the arguments runs one pytest process on what was asked, as `python -m pytest` would.
Exit status: the first failing process's status; 5 (pytest's "no tests collected") only if no process collected
any test; else 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
# Folders and files of each process; what no group names runs in a last process of its own. The kernels' ~240
# tests compile the most; the second group's ~370 compile little of their own (the servers they test are
# processes of their own); the rest, ~250, build most of the engines. One more process costs ~10 s of start-up
# and whatever programs it compiles again.
GROUPS = [
    ["tests/pallas_kernels"],
    ["tests/adapters", "tests/memory", "tests/training", "tests/server", "tests/clients", "tests/deploy"],
]
NO_TESTS = 5


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
    groups = [*GROUPS, rest(GROUPS)]
    results = []
    for paths in groups:
        t0 = time.perf_counter()
        print(f"== {' '.join(paths)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", *args, *paths], cwd=ROOT, env=dict(os.environ))
        results.append((paths, rc, time.perf_counter() - t0))
    print("\n== the suite, one process per group")
    for paths, rc, dt in results:
        state = {0: "passed", NO_TESTS: "no tests collected"}.get(rc, f"FAILED (exit status {rc})")
        print(f"{dt:7.0f} s  {state:28s} {' '.join(paths)}")
    failed = [rc for _, rc, _ in results if rc not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return NO_TESTS if all(rc == NO_TESTS for _, rc, _ in results) else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
