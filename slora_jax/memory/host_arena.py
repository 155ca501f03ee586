"""The adapter host tier's memory: one shared-memory arena, registered with the device's client on a GPU.

Reader processes write an adapter's tiles straight into a block of the arena, and the device copies them from
there: no copy of the tiles in the engine's process, no pinned allocation while serving. The arena is a memfd
(anonymous shared memory, not bounded by a container's small /dev/shm), mapped here and, through the fd passed
at their start, by the reader processes. On a GPU the whole arena is committed and registered for DMA once,
when the engine is built (``client.dma_map``: 1.6-3.3 GB/s on the H200's host for memory not yet touched, about
what growing JAX's pinned allocator costs, but once, not while serving, where that growth stalls the steps
queued behind it; benchmarks/NOTES.md). Elsewhere its pages are committed block by block, as they are first
handed out.

A block is handed out again only once the device copies started from it have completed (``note_transfer``):
on the H200 a copy from registered memory still reads its source after ``device_put`` returns, so a reader
must never overwrite tiles that a transfer is still reading. The arena holds such a copy's array only until it
is ready (``reclaim``, once per scheduling step): each one is an adapter's size of device memory.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

_log = logging.getLogger("slora_jax.memory")

ALIGN = 1 << 16  # block offsets and sizes: whole pages, and room for any dtype's alignment


@dataclass(eq=False)
class ArenaBlock:
    """``size`` bytes at ``offset`` of the arena; ``pending``: device arrays copied from it, maybe in flight."""

    offset: int
    size: int
    pending: list = field(default_factory=list)


def _ready(array) -> bool:
    try:
        return bool(array.is_ready())
    except Exception:  # noqa: BLE001 - deleted or failed: nothing reads the block any more
        return True


def _align(n: int) -> int:
    return -(-int(n) // ALIGN) * ALIGN


class HostArena:
    """A fixed-size shared-memory region and a first-fit allocator over it; thread-safe."""

    def __init__(self, nbytes: int, register: Optional[Callable[[int, int], None]] = None,
                 unregister: Optional[Callable[[int], None]] = None):
        """``nbytes`` of memfd memory, mapped here. With ``register`` (a GPU's ``client.dma_map``): committed
        whole and registered now. Raises OSError where the memory cannot be had."""
        self.size = _align(max(int(nbytes), ALIGN))
        self.fd = os.memfd_create("slora-jax-host-tier", getattr(os, "MFD_CLOEXEC", 1))
        try:
            os.ftruncate(self.fd, self.size)
            self.committed = register is not None
            if self.committed:  # reserved now: a registration or a write past the memory there is would kill us
                os.posix_fallocate(self.fd, 0, self.size)
            self._mm = mmap.mmap(self.fd, self.size)
            self.buffer = np.frombuffer(self._mm, np.uint8)
            t0 = time.perf_counter()
            self.registered = False
            if register is not None:
                register(self.buffer.ctypes.data, self.size)
                self.registered = True
            self.register_s = time.perf_counter() - t0
        except BaseException:
            os.close(self.fd)
            raise
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.size)]  # (offset, size), sorted, coalesced
        self._deferred: list[ArenaBlock] = []  # freed, waiting for their transfers
        self._uploading: dict[int, ArenaBlock] = {}  # id -> block in use with transfers maybe in flight
        self._used = 0
        self._finalizer = weakref.finalize(self, _release, self.fd, self.buffer.ctypes.data,
                                           unregister if self.registered else None)

    @classmethod
    def create(cls, nbytes: int, register=None, unregister=None) -> Optional["HostArena"]:
        """A HostArena, or None with a warning saying why there cannot be one (the host tier then keeps
        private copies)."""
        if not hasattr(os, "memfd_create"):
            _log.warning("the adapter host tier keeps private copies: this system has no memfd_create")
            return None
        try:
            return cls(nbytes, register, unregister)
        except Exception as e:  # noqa: BLE001 - out of memory, or the client would not register it
            _log.warning("the adapter host tier keeps private copies: a %.1f GiB shared arena could not be made "
                         "(%s: %s)", nbytes / (1 << 30), type(e).__name__, e)
            return None

    # ------------------------------------------------------------------ allocation
    def alloc(self, nbytes: int) -> Optional[ArenaBlock]:
        """A block of at least ``nbytes``, or None when no free run is that large (free some and try again)."""
        need = _align(max(int(nbytes), 1))
        with self._lock:
            if self.buffer is None:  # closed
                return None
            self._reclaim()
            for i, (off, size) in enumerate(self._free):
                if size >= need:
                    break
            else:
                return None
            if not self.committed:
                try:  # committed now, so that a write cannot fail later (SIGBUS) for want of memory
                    os.posix_fallocate(self.fd, off, need)
                except OSError as e:
                    _log.warning("the host tier's arena could not commit %.1f MB: %s", need / 1e6, e)
                    return None
            if size == need:
                del self._free[i]
            else:
                self._free[i] = (off + need, size - need)
            self._used += need
            return ArenaBlock(off, need)

    def note_transfer(self, block: ArenaBlock, array) -> None:
        """``array`` was copied from ``block``, perhaps asynchronously: the block is not reused before it is
        ready."""
        if not hasattr(array, "is_ready"):
            return
        with self._lock:
            block.pending = [a for a in block.pending if not _ready(a)] + [array]
            self._uploading[id(block)] = block

    def reclaim(self) -> None:
        """Drop the arrays of completed transfers, and hand out again the freed blocks they kept."""
        with self._lock:
            for key, block in list(self._uploading.items()):
                block.pending = [a for a in block.pending if not _ready(a)]
                if not block.pending:
                    del self._uploading[key]
            self._reclaim()

    def free(self, block: ArenaBlock) -> None:
        """Give ``block`` back; it is handed out again once the transfers noted on it have completed."""
        with self._lock:
            self._uploading.pop(id(block), None)
            if block.pending and not all(_ready(a) for a in block.pending):
                self._deferred.append(block)
            else:
                self._give_back(block)

    def wait_deferred(self) -> bool:
        """Wait for the transfers that keep freed blocks from reuse; True if there were any."""
        with self._lock:
            blocks = list(self._deferred)
        for block in blocks:
            for a in block.pending:
                try:
                    a.block_until_ready()
                except Exception:  # noqa: BLE001 - a failed transfer reads nothing any more
                    pass
        with self._lock:  # each of them has completed now
            for block in blocks:
                if block in self._deferred:
                    self._deferred.remove(block)
                    self._give_back(block)
        return bool(blocks)

    def _reclaim(self) -> None:
        still = []
        for block in self._deferred:
            if all(_ready(a) for a in block.pending):
                self._give_back(block)
            else:
                still.append(block)
        self._deferred = still

    def _give_back(self, block: ArenaBlock) -> None:
        block.pending = []
        self._used -= block.size
        i = bisect.bisect(self._free, (block.offset, 0))
        off, size = block.offset, block.size
        if i < len(self._free) and self._free[i][0] == off + size:  # merge with the run after it
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:  # and the one before
            off, size = self._free[i - 1][0], self._free[i - 1][1] + size
            i -= 1
            del self._free[i]
        self._free.insert(i, (off, size))

    # ------------------------------------------------------------------ access
    def view(self, block: ArenaBlock, nbytes: Optional[int] = None) -> np.ndarray:
        """The block's bytes (its first ``nbytes``) as a uint8 array over the arena."""
        return self.buffer[block.offset:block.offset + (block.size if nbytes is None else nbytes)]

    @property
    def used_bytes(self) -> int:
        """Bytes in blocks handed out (with those freed but still waiting for a transfer)."""
        return self._used

    @property
    def largest_free(self) -> int:
        with self._lock:
            return max((s for _, s in self._free), default=0)

    def close(self) -> None:
        """Wait for the uploads from freed blocks, unregister and close the fd; the mapping goes when the last
        array over it does."""
        self.wait_deferred()
        with self._lock:
            self.buffer = None  # no block is handed out from here on
        self._finalizer()
        try:  # the memory goes now, unless arrays over it are still alive (it goes with the last of them then)
            self._mm.close()
        except BufferError:
            pass


def _release(fd: int, ptr: int, unregister) -> None:
    if unregister is not None:
        try:
            unregister(ptr)
        except Exception as e:  # noqa: BLE001 - the client is gone already (interpreter exit)
            _log.debug("dma_unmap of the host arena failed: %s", e)
    try:
        os.close(fd)
    except OSError:
        pass
