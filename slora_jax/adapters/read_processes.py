"""Adapter reads in worker processes, for an engine whose own thread keeps the interpreter busy.

A reader thread shares the GIL with the engine thread. Each step of a read (every tensor's file read, the
NaN check, each copy into tiles) gives the GIL up and takes it back: hundreds of hand-overs per adapter, and
with the engine thread running Python each one can wait for the interpreter's switch interval (5 ms). On
the H200, 1000 cold adapters were read at 0.82 GB/s beside the engine against 2.6 GB/s with nothing else
running; on a 2-core CPU one reader fell from ~1.3 to 0.01-0.5 GB/s beside a thread running Python
(benchmarks/NOTES.md). Here the read, the check and the tiling run in processes of their own, straight into
the host tier's shared arena (memory.host_arena, registered for DMA on a GPU): the engine's process does
nothing per adapter but wait for one answer. Where the arena has no block for an adapter, the worker writes
into a buffer of its own and the engine's process copies the tiles out of it.

Each worker is a plain ``python -m slora_jax.adapters.read_worker`` child fed requests through a pipe, not a
multiprocessing worker: those import the caller's main module again (a user's script without a
``__main__`` guard would run once more in every reader). Each worker inherits the arena's fd and maps it
once; its own buffer, if it needs one, is a file in /dev/shm (memory, not disk, reserved when made) that
both processes map once.

Nothing here can stop reads: where the workers cannot start (without an arena, no room in /dev/shm, whose
default in a container is 64 MB; a Python that cannot import the package; no /dev/shm), ``start`` says why in
a warning and returns None, and the engine reads on threads. A worker that dies during a read is replaced and the
read tried once more. Workers run in a session of their own (Ctrl-C in a terminal or a notebook reaches
the engine, not them) and end when the engine closes or exits; buffers of an engine that was killed are
removed by the next one to start.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import re
import select
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
_PREFIX = "slora-jax-reads-"
READY_TIMEOUT_S = 120.0  # a worker's start: the package's imports (~5 s on an idle machine)


def start(workers: int, slot_bytes: int, shm_dir: str = SHM_DIR, arena=None) -> Optional["ProcessReaders"]:
    """``workers`` reader processes, started and answering; or None, with a warning saying why, where they
    cannot be (reads then run on threads). With ``arena`` (a memory.host_arena.HostArena) they write adapters
    into its blocks; a read without a block goes through a buffer of the worker's own in ``shm_dir``, of
    ``slot_bytes`` to begin with (grown on demand; without an arena made now)."""
    try:
        _sweep(shm_dir)
        if arena is None:
            st = os.statvfs(shm_dir)
            free = st.f_bavail * st.f_frsize
            need = workers * slot_bytes
            if free < 2 * need:  # half of it at most, so the readers never fill what other programs use
                raise OSError(f"{shm_dir} has {free / 1e9:.2f} GB free; the reader processes' buffers would "
                              f"take {need / 1e9:.2f} GB")
        return ProcessReaders(workers, 0 if arena is not None else slot_bytes, shm_dir, arena)
    except (OSError, EOFError, pickle.UnpicklingError, TimeoutError) as e:
        log.warning("adapter reads run on threads: reader processes did not start (%s: %s)", type(e).__name__, e)
        return None


def _sweep(shm_dir: str) -> None:
    """Remove the buffers of engines that ended without closing (killed): each folder names its process."""
    try:
        names = os.listdir(shm_dir)
    except OSError:  # no such folder: nothing was left there
        return
    for name in names:
        m = re.match(re.escape(_PREFIX) + r"(\d+)-", name)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(shm_dir, name), ignore_errors=True)
        except OSError:  # alive, another user's
            pass


class ProcessReaders:
    """Reader processes, each with its own shared buffer (made at its first read without an arena block).
    ``read`` may be called from several threads at once: each call takes an idle worker (waiting for one)
    until the adapter is in place."""

    def __init__(self, workers: int, slot_bytes: int, shm_dir: str = SHM_DIR, arena=None):
        self.workers = workers
        self._shm_dir = shm_dir
        self._arena = arena
        self._procs: list[Optional[subprocess.Popen]] = [None] * workers
        self._closed = threading.Event()
        # The buffers are memory and the workers hold some: both go with this object even without close().
        self._folder: list[Optional[str]] = [None]  # the buffers' folder, made at the first buffer
        self._cleanup = weakref.finalize(self, _shut, self._procs, self._folder)
        self._idle: "queue.Queue[int]" = queue.Queue()
        self._buffers: list[Optional[np.memmap]] = [None] * workers
        self._sizes = [0] * workers
        try:
            if slot_bytes:
                for i in range(workers):
                    self._ensure(i, slot_bytes)
            for i in range(workers):  # all start at once, then each is waited for
                self._procs[i] = self._spawn()
            for i in range(workers):
                self._ready(self._procs[i])
                self._idle.put(i)
        except BaseException:
            self._cleanup()
            raise

    def _path(self, i: int) -> str:
        if self._folder[0] is None:
            self._folder[0] = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=self._shm_dir)
        return os.path.join(self._folder[0], f"buffer-{i}")

    @property
    def folder(self) -> Optional[str]:
        """Where the workers' own buffers are (None until one is made)."""
        return self._folder[0]

    def _ensure(self, i: int, size: int) -> None:
        """Buffer ``i`` holds at least ``size`` bytes (grown for a larger adapter than any before). The
        memory is reserved here: a write past what /dev/shm can hold would kill the writer (SIGBUS)."""
        if self._sizes[i] >= size:
            return
        size = max(size, 2 * self._sizes[i])
        fd = os.open(self._path(i), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # on failure the buffer stays as it was, still usable
        finally:
            os.close(fd)
        self._buffers[i] = np.memmap(self._path(i), np.uint8, "r+", shape=(size,))
        self._sizes[i] = size

    def _spawn(self) -> subprocess.Popen:
        # The worker finds the package where this process did (a notebook may have put it on sys.path), and
        # keeps JAX, imported with the package, off every accelerator. It inherits the arena's fd.
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)))
        fds = ()
        if self._arena is not None:
            from slora_jax.adapters.read_worker import ARENA_ENV

            fds = (self._arena.fd,)
            env[ARENA_ENV] = f"{self._arena.fd},{self._arena.size},{int(self._arena.committed)}"
        return subprocess.Popen([sys.executable, "-m", "slora_jax.adapters.read_worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, start_new_session=True, pass_fds=fds)

    @staticmethod
    def _ready(proc: subprocess.Popen) -> None:
        """Wait for the worker's first message: it has imported what a read needs."""
        if not select.select([proc.stdout], [], [], READY_TIMEOUT_S)[0]:
            proc.kill()
            raise TimeoutError(f"a reader process did not start within {READY_TIMEOUT_S:.0f} s")
        try:
            ok, _ = receive(proc.stdout)
        except EOFError:
            raise OSError(f"a reader process exited at start (exit code {proc.wait()}; its stderr says why)") \
                from None
        if ok != "ready":
            raise OSError(f"a reader process answered {ok!r} at start")

    def _worker(self, i: int) -> subprocess.Popen:
        proc = self._procs[i]
        if proc.poll() is not None:  # died since its last read: a new one
            proc = self._procs[i] = self._spawn()
            self._ready(proc)
        return proc

    def read(self, plan, model_config, layout, max_rank: int, dtype, size: int, block=None,
             copy_out: Optional[Callable[[np.ndarray], object]] = None, threads: int = 1):
        """Read ``plan``'s adapter (tiles of ``size`` bytes) in a worker process. Into ``block`` of the arena
        when given: the PagedAdapter's tiles are then a view of it. Otherwise into the worker's own buffer,
        from which ``copy_out(view)`` must copy the tiles (the buffer is reused as soon as this returns) and
        return the copy. ``threads``: the worker's threads for this one read. Returns (PagedAdapter, file bytes
        read). Raises AdapterError; OSError where the worker's buffer cannot grow (the caller reads on a
        thread)."""
        from slora_jax.adapters.paging import PagedAdapter

        i = self._idle.get()
        try:
            if self._closed.is_set():
                raise AdapterError("the engine closed while the adapter was being read")
            if block is not None:
                target, offset, span = (self._arena.fd, self._arena.size, self._arena.committed), block.offset, \
                    block.size
            else:
                self._ensure(i, size)
                target, offset, span = (self._path(i), self._sizes[i], True), 0, self._sizes[i]
            for attempt in (1, 2):  # a worker that dies mid-read is replaced once: the file may be fine
                proc = self._worker(i)
                request = (target, offset, span, plan, model_config, layout, max_rank, np.dtype(dtype), threads)
                try:
                    send(proc.stdin, request)
                    ok, answer = receive(proc.stdout)
                    break
                except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
                    proc.kill()
                    code = proc.wait()
                    if attempt == 2 or self._closed.is_set():
                        raise AdapterError("the adapter reader process stopped during the read twice (out of "
                                           f"memory, or killed; exit code {code}): {type(e).__name__}: {e}") from e
                    log.warning("an adapter reader process stopped during a read (exit code %s); reading again", code)
                except BaseException:  # Ctrl-C while it reads: its answer would be read as the next one's
                    proc.kill()
                    proc.wait()
                    raise
            if not ok:
                raise answer
            shape, groups, num_pages, transposed, nbytes = answer
            if self._closed.is_set():
                raise AdapterError("the engine closed while the adapter was being read")
            if block is not None:
                tiles = np.ndarray(shape, np.dtype(dtype), buffer=self._arena.buffer, offset=block.offset)
            else:
                tiles = copy_out(np.ndarray(shape, np.dtype(dtype), buffer=self._buffers[i]))
            return PagedAdapter(tiles, groups, num_pages, transposed), nbytes
        finally:
            self._idle.put(i)

    def close(self) -> None:
        self._closed.set()
        self._cleanup()
        self._buffers = [None] * self.workers


def _shut(procs: list, folder: list) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()  # the worker's loop ends at end of input
                proc.wait(5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                proc.kill()
    if folder[0] is not None:
        shutil.rmtree(folder[0], ignore_errors=True)


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
