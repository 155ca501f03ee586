"""The adapter reader process (``python -m slora_jax.adapters.read_worker``; see read_processes): reads one
adapter per request from its pipe into the shared memory the request names (a span of the host tier's arena,
by its inherited fd, or the worker's own buffer file), and answers with the tiles' shape and the
PagedAdapter's small fields, or the AdapterError saying why the read failed."""

from __future__ import annotations

import mmap
import os
import pickle
import sys
from typing import BinaryIO

import numpy as np

from slora_jax.adapters.read_processes import receive, send
from slora_jax.adapters.reader import read_paged_adapter
from slora_jax.errors import AdapterError


def _map(target: tuple) -> np.ndarray:
    """(fd or path, size, committed) -> that shared memory as bytes, mapped for reading and writing. Memory
    committed already is mapped populated: one call here instead of a fault per 4 KiB page at the first write
    of each block (a 51 MB adapter: 12,500 faults)."""
    where, size, committed = target
    if isinstance(where, int):
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if committed else 0)
        return np.frombuffer(mmap.mmap(where, size, flags=flags), np.uint8)
    return np.memmap(where, np.uint8, "r+", shape=(size,))


ARENA_ENV = "SLORA_JAX_READER_ARENA"  # "fd,size,committed" of the host tier's arena, mapped before "ready"


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """A request per read, an answer per request, until the parent closes the pipe."""
    mapped: dict[tuple, np.ndarray] = {}
    arena = os.environ.get(ARENA_ENV)
    if arena:  # at start, in the background of the engine's start: not in the first read's time
        fd, size, committed = (int(x) for x in arena.split(","))
        target = (fd, size, bool(committed))
        mapped[target] = _map(target)
    send(answers, ("ready", os.getpid()))
    while True:
        try:
            target, offset, span, plan, model_config, layout, max_rank, dtype, threads = receive(requests)
        except EOFError:
            return
        try:
            have = mapped.get(target)
            if have is None:  # mapped once (per size of a growing buffer): a new mapping faults on each 4 KiB
                for old in [t for t in mapped if t[0] == target[0]]:
                    del mapped[old]
                have = mapped[target] = _map(target)
            out = have[offset:offset + span]
            paged, nbytes = read_paged_adapter(plan, model_config, layout, max_rank, dtype, out, threads)
            if not np.shares_memory(paged.tiles, out):
                raise AdapterError(f"internal: the read buffer ({span} bytes) is smaller than the adapter's "
                                   f"tiles ({paged.tiles.nbytes} bytes)")
            answer = (True, (paged.tiles.shape, paged.groups, paged.num_pages, paged.transposed, nbytes))
        except AdapterError as e:
            answer = (False, e)
        except Exception as e:  # noqa: BLE001 - any failure is this adapter's, said in its error
            answer = (False, AdapterError(f"reading {getattr(plan, 'weights_path', '?')} failed: "
                                          f"{type(e).__name__}: {e}"))
        try:
            send(answers, answer)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # an error that does not pickle: its text
            send(answers, (False, AdapterError(f"{answer[1]} ({type(e).__name__} sending it back)")))


if __name__ == "__main__":
    # Answers go on a copy of stdout; stdout itself goes to stderr, so a stray print cannot corrupt them.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, out)
