"""Pinned host memory for the adapter host tier, taken once when the engine is built (GPU).

The host tier lives in a shared arena (``host_arena``), registered with the device's client, so that copies
to the device are asynchronous DMA. Where that arena cannot be made, the tier's copies go to JAX's pinned host
memory instead. That memory comes from an allocator which grows by pinning a new region when it runs out,
and while it pins, the step programs queued behind it wait: on the H200, 100 new 51 MB arrays made beside a
2 ms step loop stalled it for up to 1.8 s, while the same arrays made again, after the first were freed, stalled
nothing (``benchmarks/host_transfer.py``). A cold pass over 1000 adapters grows the tier by 51 GB while
serving, so there the room is taken up front: one array of the tier's size, freed at once, leaves the
allocator that large (it keeps what it pinned)."""

import logging
import os
import time
from typing import Callable, Optional

import numpy as np

_log = logging.getLogger("slora_jax.memory")

# At most this share of the machine's memory is pinned up front: pinned pages cannot be swapped or reclaimed,
# and the reader buffers, the page cache of the adapter files and the rest of the process need room too.
MAX_SHARE_OF_RAM = 0.5


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: nothing is reserved
        return 0


def reservation_bytes(host_cache_bytes: int) -> int:
    """What to pin for a host tier bounded by ``host_cache_bytes``: the bound, capped at MAX_SHARE_OF_RAM of
    the machine (past the reservation the allocator still grows when it must, at the cost above)."""
    return min(max(0, int(host_cache_bytes)), int(physical_memory_bytes() * MAX_SHARE_OF_RAM))


def to_pinned_host(device) -> Optional[Callable]:
    """numpy -> an array in ``device``'s pinned host memory; None where the backend has none."""
    import jax

    try:
        sharding = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    except Exception:  # memory kinds unsupported on this backend
        return None

    def put(x):
        return jax.device_put(x, sharding)
    return put


def reserve(put: Callable, nbytes: int, min_bytes: int = 256 << 20) -> tuple[int, float]:
    """Grow the pinned allocator behind ``put`` to hold ``nbytes``: one array that size, freed at once. Where
    the allocator refuses it (its own limit, or the machine's), half the size is tried, down to ``min_bytes``.
    Returns (bytes reserved, seconds taken)."""
    t0 = time.perf_counter()
    size = int(nbytes)
    while size >= min_bytes:
        try:
            # np.zeros maps untouched pages that read as zero: no host memory is written to make the source.
            arr = put(np.zeros(size, np.uint8))
            block = getattr(arr, "block_until_ready", None)
            if block is not None:
                block()
            del arr
            return size, time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - out of pinned memory: try less
            _log.info("pinning %.1f GiB of host memory failed (%s); trying half", size / (1 << 30), e)
            size //= 2
    return 0, time.perf_counter() - t0


def host_arena(host_cache_bytes: int, device=None):
    """The host tier's arena (``reservation_bytes`` of it), registered for DMA with ``device``'s client when a
    device is given; None where none can be made (a warning says why)."""
    from slora_jax.memory.host_arena import HostArena

    size = reservation_bytes(host_cache_bytes)
    if size <= 0:
        return None
    client = getattr(device, "client", None) if device is not None else None
    register = getattr(client, "dma_map", None)
    arena = HostArena.create(size, register, getattr(client, "dma_unmap", None))
    if arena is not None and arena.registered:
        _log.info("registered a %.1f GiB host arena for the adapter host tier in %.2f s", arena.size / (1 << 30),
                  arena.register_s)
    return arena
