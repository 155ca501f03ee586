"""Adapter reads in worker processes, for an engine whose own thread keeps the interpreter busy.

A reader thread shares the GIL with the engine thread. Each step of a read (every tensor's file read, the
NaN check, each copy into tiles) gives the GIL up and takes it back: hundreds of hand-overs per adapter, and
with the engine thread running Python each one can wait for the interpreter's switch interval (5 ms). On
the H200, 1000 cold adapters were read at 0.82 GB/s beside the engine against 2.6 GB/s with nothing else
running; on a 2-core CPU one reader fell from ~1.3 to 0.01-0.5 GB/s beside a thread running Python
(benchmarks/NOTES.md). Here the read, the check and the tiling run in processes of their own, into buffers
in shared memory; the engine's process only copies each finished adapter out of its buffer (into pinned host
memory on a GPU), one hand-over per adapter.

Each worker is a plain ``python -m slora_jax.adapters.read_worker`` child fed requests through a pipe, not a
multiprocessing worker: those import the caller's main module again (a user's script without a
``__main__`` guard would run once more in every reader). Each worker owns one buffer, a file in /dev/shm
(memory, not disk) that both processes map once. Where /dev/shm lacks the room (a container's default is 64 MB), ``start`` returns None and the
engine reads on threads as before.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import weakref
from typing import BinaryIO, Callable, Optional

import numpy as np

from slora_jax.errors import AdapterError

log = logging.getLogger("slora_jax.adapters")

SHM_DIR = "/dev/shm"


def start(workers: int, slot_bytes: int, shm_dir: str = SHM_DIR) -> Optional["ProcessReaders"]:
    """``workers`` reader processes with a buffer of ``slot_bytes`` each, or None where shared memory lacks
    the room (logged once: reads then run on threads)."""
    try:
        st = os.statvfs(shm_dir)
        free = st.f_bavail * st.f_frsize
    except OSError as e:
        log.info("adapter reads run on threads: no shared memory folder %s (%s)", shm_dir, e)
        return None
    need = workers * slot_bytes
    if free < 2 * need:  # half of it at most, so the readers never fill what other programs use
        log.info("adapter reads run on threads: %s has %.1f GB free, reader processes would take %.1f GB",
                 shm_dir, free / 1e9, need / 1e9)
        return None
    return ProcessReaders(workers, slot_bytes, shm_dir)


class ProcessReaders:
    """Reader processes, each with its own shared buffer. ``read`` may be called from several threads at
    once: each call takes an idle worker (waiting for one) until its tiles are copied out."""

    def __init__(self, workers: int, slot_bytes: int, shm_dir: str = SHM_DIR):
        self.workers = workers
        self._dir = tempfile.mkdtemp(prefix="slora-jax-reads-", dir=shm_dir)
        self._procs: list[Optional[subprocess.Popen]] = [None] * workers
        # The buffers are memory and the workers hold some: both go with this object even without close().
        self._cleanup = weakref.finalize(self, _shut, self._procs, self._dir)
        self._idle: "queue.Queue[int]" = queue.Queue()
        self._buffers: list[Optional[np.memmap]] = [None] * workers
        self._sizes = [0] * workers
        for i in range(workers):
            self._ensure(i, slot_bytes)
            self._idle.put(i)

    def _path(self, i: int) -> str:
        return os.path.join(self._dir, f"buffer-{i}")

    def _ensure(self, i: int, size: int) -> None:
        """Buffer ``i`` holds at least ``size`` bytes (grown for a larger adapter than any before)."""
        if self._sizes[i] >= size:
            return
        size = max(size, 2 * self._sizes[i])
        self._buffers[i] = None
        with open(self._path(i), "wb") as f:
            f.truncate(size)
        self._buffers[i] = np.memmap(self._path(i), np.uint8, "r+", shape=(size,))
        self._sizes[i] = size

    def _worker(self, i: int) -> subprocess.Popen:
        proc = self._procs[i]
        if proc is None or proc.poll() is not None:
            # JAX comes in with the package; the worker keeps it off every accelerator.
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            proc = self._procs[i] = subprocess.Popen(
                [sys.executable, "-m", "slora_jax.adapters.read_worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, env=env)
        return proc

    def read(self, plan, model_config, layout, max_rank: int, dtype, copy_out: Callable[[np.ndarray], object],
             size: int):
        """Read ``plan``'s adapter in a worker process into tiles of ``size`` bytes; ``copy_out(view)`` must
        copy the tiles out of the shared buffer (it is reused as soon as this returns) and return the copy.
        Returns (PagedAdapter over that copy, file bytes read). Raises AdapterError."""
        from slora_jax.adapters.paging import PagedAdapter

        i = self._idle.get()
        try:
            self._ensure(i, size)
            proc = self._worker(i)
            request = (self._path(i), self._sizes[i], plan, model_config, layout, max_rank, np.dtype(dtype))
            try:
                send(proc.stdin, request)
                ok, answer = receive(proc.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as e:
                proc.kill()
                raise AdapterError("the adapter reader process stopped during the read (out of memory, or "
                                   f"killed; exit code {proc.wait()}): {type(e).__name__}: {e}") from e
            if not ok:
                raise answer
            shape, groups, num_pages, transposed, nbytes = answer
            view = np.ndarray(shape, np.dtype(dtype), buffer=self._buffers[i])
            return PagedAdapter(copy_out(view), groups, num_pages, transposed), nbytes
        finally:
            self._idle.put(i)

    def close(self) -> None:
        self._buffers = [None] * self.workers
        self._cleanup()


def _shut(procs: list, folder: str) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.stdin.close()  # the worker's loop ends at end of input
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    shutil.rmtree(folder, ignore_errors=True)


def send(f: BinaryIO, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def receive(f: BinaryIO):
    head = f.read(8)
    if len(head) < 8:
        raise EOFError("the pipe closed")
    (n,) = struct.unpack("<Q", head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError("the pipe closed mid-message")
    return pickle.loads(data)
