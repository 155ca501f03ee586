"""Adapter reads in reader processes (``EngineConfig(adapter_readers="processes")``): the same tiles as the
float32 loader, reads in parallel, failures (a corrupt file, a deleted one, a reader killed mid-read) that fail
only their adapter, shared memory too small, a user's script without a ``__main__`` guard, and clean-up."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from slora_jax.adapters import read_processes
from slora_jax.config import EngineConfig
from slora_jax.errors import AdapterError, ConfigError
from tests.adapters.test_reader import assert_same_paged, folders, make_store, reference
from tests.bench.sim import TINY, Sim

REPO = Path(__file__).resolve().parents[2]


def process_store(workers=2, **econf):
    store, writes = make_store(workers=workers, adapter_readers="processes", **econf)
    return store, writes


def started(store, first_dir):
    """Register ``first_dir`` lazily (which starts the readers) and wait until they answer."""
    store.register(first_dir.name, first_dir, lazy=True)
    assert store.wait_for_readers(timeout=180) == "processes"


def test_config_names_the_choices():
    assert EngineConfig().resolved_readers("gpu") == "processes"
    assert EngineConfig().resolved_readers("cpu") == "threads"
    assert EngineConfig(adapter_readers="threads").resolved_readers("gpu") == "threads"
    with pytest.raises(ConfigError, match="adapter_readers must be 'auto', 'threads' or 'processes', got 'proc'"):
        EngineConfig(adapter_readers="proc")


@pytest.mark.slow  # starts reader processes (each imports the package: seconds)
def test_process_reads_match_the_float32_loader_and_run_in_parallel(tmp_path):
    dirs = folders(tmp_path, 4, rank=16)
    dirs.append(dirs[0].parent / "big")
    folders(tmp_path / "tmp", 1, rank=64)[0].rename(dirs[-1])  # larger than the first: grows a buffer
    store, _ = process_store(workers=2)
    try:
        started(store, dirs[0])
        for d in dirs[1:]:
            store.register(d.name, d, lazy=True)
        assert store.read_ahead([d.name for d in dirs]) == 5
        store.wait_reads(timeout=120)
        store.begin_step(1)
        procs = store._procs
        assert procs is not None and procs.workers == 2
        pids = {p.pid for p in procs._procs if p is not None}
        assert len(pids) == 2 and os.getpid() not in pids  # both workers took reads, outside this process
        c = store.counters
        assert c["reads"] == 5 and c["read_failures"] == 0
        blocks = set()
        for d in dirs:  # each host copy lies in a block of the arena of its own, written by a worker
            paged = store._host[d.name]
            assert np.shares_memory(paged.tiles, store._arena.buffer)
            blocks.add(store._blocks[id(paged.tiles)][1].offset)
            assert_same_paged(paged, reference(d, TINY, store.layout, np.float32))
        assert len(blocks) == 5 and all(b is None for b in procs._buffers)  # no buffer of their own needed
    finally:
        store.close()


@pytest.mark.slow  # starts reader processes (each imports the package: seconds)
def test_a_corrupt_and_a_deleted_file_fail_their_adapter_only(tmp_path):
    good, bad, gone = folders(tmp_path, 3, rank=16)
    weights = bad / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = np.full(16, np.nan, np.float32).tobytes()  # NaN in the last tensor's values
    weights.write_bytes(bytes(data))
    sim = Sim(max_batch_size=4, adapter_readers="processes")
    try:
        started(sim.store, good)
        for d in (bad, gone):
            sim.store.register(d.name, d, lazy=True)
        import shutil

        shutil.rmtree(gone)
        ok = sim.add(4, 6, good.name)
        sim.step()
        failing, lost = sim.add(4, 3, bad.name), sim.add(4, 3, gone.name)
        for _ in range(3):
            sim.step()
            sim.store.wait_reads(timeout=120)
        sim.run()
        assert ok.finish_reason == "length" and len(ok.output) == 6
        assert failing.finish_reason == "abort" and "non-finite" in failing.error and bad.name in failing.error
        assert lost.finish_reason == "abort" and "no longer exists" in lost.error
        assert sim.store.counters["read_failures"] == 2
        sim.pool.check_invariants()
    finally:
        sim.store.close()


@pytest.mark.slow  # starts reader processes, kills them
@pytest.mark.parametrize("kills", [1, 2])
def test_a_reader_killed_mid_read_is_replaced_and_the_read_tried_once_more(tmp_path, monkeypatch, kills, caplog):
    first, second = folders(tmp_path, 2, rank=16)
    store, _ = process_store(workers=1)
    try:
        started(store, first)
        store.register(second.name, second, lazy=True)
        real = read_processes.send
        killed = []

        def send_then_kill(f, obj):  # the worker dies with the request in its pipe, before answering
            real(f, obj)
            if isinstance(obj, tuple) and len(killed) < kills:
                proc = next(p for p in store._procs._procs if p.stdin is f)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed.append(proc.pid)

        monkeypatch.setattr(read_processes, "send", send_then_kill)
        store.read_ahead([second.name])
        store.wait_reads(timeout=180)
        store.begin_step(1)
        assert len(killed) == kills
        if kills == 1:  # the second worker read it
            assert store.failed(second.name) is None
            assert_same_paged(store._host[second.name], reference(second, TINY, store.layout, np.float32))
        else:
            assert "stopped during the read twice" in store.failed(second.name)
            with pytest.raises(AdapterError, match="could not be read"):
                store.acquire(second.name)
        monkeypatch.setattr(read_processes, "send", real)
        store.unregister(second.name)
        store.register(second.name, second, lazy=True)
        store.read_ahead([second.name])
        store.wait_reads(timeout=180)
        store.begin_step(2)
        assert store.failed(second.name) is None and store.info(second.name).location == "host"
        assert store._procs._procs[0].pid not in killed, caplog.text  # read by a live worker
    finally:
        store.close()


def test_readers_that_cannot_start_leave_reads_on_threads(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(read_processes.sys, "executable", "/bin/false")  # exits at once, says nothing
    (d,) = folders(tmp_path, 1)
    store, _ = process_store()
    with caplog.at_level("WARNING", logger="slora_jax.adapters"):
        store.register(d.name, d, lazy=True)
        assert store.wait_for_readers(timeout=60) == "threads"
    assert "reader processes did not start" in caplog.text and "exited at start" in caplog.text
    store.read_ahead([d.name])
    store.wait_reads(timeout=60)
    store.begin_step(1)
    assert_same_paged(store._host[d.name], reference(d, TINY, store.layout, np.float32))
    store.close()


@pytest.mark.parametrize("arena", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_too_little_shared_memory_reads_on_threads_without_an_arena(tmp_path, monkeypatch, caplog, arena):
    """/dev/shm holds the workers' own buffers, which only a host tier without an arena needs (a container's
    /dev/shm is 64 MB by default; the arena is a memfd, not bounded by it)."""
    class Tiny:
        f_bavail, f_frsize = 16, 4096

    monkeypatch.setattr(read_processes.os, "statvfs", lambda path: Tiny())
    (d,) = folders(tmp_path, 1)
    store, _ = process_store(**({} if arena else {"arena_bytes": None}))
    try:
        with caplog.at_level("WARNING", logger="slora_jax.adapters"):
            store.register(d.name, d)
            assert store.wait_for_readers(timeout=180) == ("processes" if arena else "threads")
        if not arena:
            assert "adapter reads run on threads" in caplog.text and "GB free" in caplog.text
        store.unregister(d.name)
        store.register(d.name, d)  # by a worker, with an arena
        assert_same_paged(store._host[d.name], reference(d, TINY, store.layout, np.float32))
    finally:
        store.close()


@pytest.mark.slow  # starts reader processes (each imports the package: seconds)
def test_close_ends_the_workers_and_frees_the_shared_memory(tmp_path):
    small, big = folders(tmp_path, 1)[0], folders(tmp_path / "big", 1, rank=64)[0]
    store, _ = process_store(workers=1, arena_bytes=None)
    started(store, small)
    store.register("big", big)  # the worker's buffer, made by its first read
    procs = store._procs
    folder, worker = procs.folder, procs._procs[0]
    assert os.path.isdir(folder) and worker.poll() is None
    store.close()
    assert worker.wait(10) == 0 and not os.path.exists(folder)


@pytest.mark.slow  # starts an engine in a fresh interpreter, ~15 s
def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """Reader processes must not import the user's main module again (multiprocessing's spawn would), and
    find the package where the user's process did."""
    (d,) = folders(tmp_path, 1)
    marker = tmp_path / "runs.txt"
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})  # the package found only through sys.path, as notebooks do
        import slora_jax as sj
        from slora_jax.model.init import random_params
        from slora_jax.model.random_checkpoint import tiny_llama_config
        with open({str(marker)!r}, "a") as f:
            f.write("ran\\n")
        cfg = tiny_llama_config()
        eng = sj.Engine(cfg, random_params(cfg, seed=0),
                        sj.EngineConfig(adapter_readers="processes", num_pages=256, compile_cache_dir=None))
        eng.load_adapter("a", {str(d)!r}, lazy=True)
        deadline = time.time() + 240
        while eng.stats()["adapter_readers"] != "processes" and time.time() < deadline:
            time.sleep(0.2)
        print("readers", eng.stats()["adapter_readers"])
        out = eng.generate([[1, 2, 3]], adapters=["a"], sampling=sj.SamplingParams(max_tokens=3))
        print("tokens", len(out[0].token_ids))
        eng.close()
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=400, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "readers processes" in run.stdout and "tokens 3" in run.stdout
    assert marker.read_text() == "ran\n"


@pytest.mark.slow  # starts reader processes (each imports the package: seconds)
def test_buffers_of_a_killed_engine_are_removed_by_the_next(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"slora-jax-reads-{dead.pid}-abc"
    left.mkdir()
    (left / "buffer-0").write_bytes(b"x" * 10)
    mine = tmp_path / f"slora-jax-reads-{os.getpid()}-abc"
    mine.mkdir()
    readers = read_processes.start(1, 1 << 20, shm_dir=str(tmp_path))
    try:
        assert readers is not None
        assert not left.exists() and mine.exists()  # a live process's folder stays
    finally:
        readers.close()


@pytest.mark.slow  # starts a reader process
def test_a_buffer_that_cannot_grow_reads_that_adapter_on_a_thread(tmp_path, monkeypatch, caplog):
    from slora_jax.model.random_checkpoint import write_random_adapter

    small, big = folders(tmp_path, 1, rank=8)[0], write_random_adapter(tmp_path / "big", TINY, rank=64, seed=5)
    store, _ = process_store(workers=1, arena_bytes=None)
    try:
        started(store, small)
        real = read_processes.os.posix_fallocate

        def full(fd, offset, size):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(read_processes.os, "posix_fallocate", full)
        with caplog.at_level("WARNING", logger="slora_jax.adapters"):
            store.register(big.name, big)  # larger than the buffer, which cannot grow
        assert "read on a thread" in caplog.text and "No space left" in caplog.text
        assert_same_paged(store._host[big.name], reference(big, TINY, store.layout, np.float32))
        monkeypatch.setattr(read_processes.os, "posix_fallocate", real)
        store.unregister(small.name)
        store.register(small.name, small)  # the worker and its buffer still serve reads that fit
        assert store.reader_mode == "processes"
        assert_same_paged(store._host[small.name], reference(small, TINY, store.layout, np.float32))
    finally:
        store.close()
