"""The adapter reader process (``python -m slora_jax.adapters.read_worker``; see read_processes): reads one
adapter per request from its pipe into the shared buffer the request names, and answers with the tiles' shape
and the PagedAdapter's small fields, or the AdapterError saying why the read failed."""

from __future__ import annotations

import os
import pickle
import sys
from typing import BinaryIO

import numpy as np

from slora_jax.adapters.read_processes import receive, send
from slora_jax.adapters.reader import read_paged_adapter
from slora_jax.errors import AdapterError


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """A request per read, an answer per request, until the parent closes the pipe."""
    mapped: dict[str, tuple[int, np.memmap]] = {}
    send(answers, ("ready", os.getpid()))
    while True:
        try:
            path, size, plan, model_config, layout, max_rank, dtype = receive(requests)
        except EOFError:
            return
        try:
            have = mapped.get(path)
            if have is None or have[0] != size:  # mapped once per size: a new mapping faults on each 4 KiB
                mapped[path] = have = (size, np.memmap(path, np.uint8, "r+", shape=(size,)))
            paged, nbytes = read_paged_adapter(plan, model_config, layout, max_rank, dtype, have[1])
            if not np.shares_memory(paged.tiles, have[1]):
                raise AdapterError(f"internal: the read buffer ({size} bytes) is smaller than the adapter's "
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
