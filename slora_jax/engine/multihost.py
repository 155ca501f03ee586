"""One engine over the devices of several processes: every process makes process 0's scheduling decisions.

Design: each process runs the whole engine (scheduler, page pool, adapter store, step loop) on the same
model and adapters, and process 0's scheduler input is the only one: at every drain of the inbox process 0
sends what it drained (new requests, aborts) and its clock to the others, which apply exactly that. Given
the same input the host side decides the same way everywhere (pages, adapter slots, batches, sampling
seeds travel inside the requests), so every process queues the same step programs in the same order, which
a program split over their devices needs. This sends a few hundred bytes a step instead of each step's
device inputs and adapter tiles, and keeps every process's engine a complete one: each reads outputs and
can answer its own ``generate`` calls. The host's decisions that hang on timing are made the same way:
the clock is process 0's, and adapter prefetch (whose decisions depend on when a disk read or a copy
finishes) is off.

A process other than 0 either runs ``Engine.follow()`` (serving: only process 0 takes requests), or makes
the same ``Engine`` calls as process 0 with the same arguments (one program on every process, as JAX's own
multi-process programs are written): its requests then get the ids of process 0's, and their outputs.
"""

from __future__ import annotations

import pickle
import time
import uuid
from typing import Optional

from sharding import HostBroadcast
from slora_jax.errors import ProcessMismatchError


def _same(a, b) -> bool:
    return (a.request_id, a.prompt, a.adapter, a.sampling) == (b.request_id, b.prompt, b.adapter, b.sampling)


class SharedInbox:
    """Process 0's inbox and clock, on every process. ``exchange`` is called at the same points everywhere."""

    def __init__(self, name: str):
        self.channel = HostBroadcast(name)
        # Request ids are the same on every process (a counter and this suffix, process 0's), so a request
        # that another process submits too is matched to process 0's by its id.
        if self.channel.is_source:
            self.id_suffix = uuid.uuid4().hex[:6]
            self.channel.send(self.id_suffix.encode())
        else:
            self.id_suffix = self.channel.receive().decode()

    @property
    def is_source(self) -> bool:
        return self.channel.is_source

    def exchange(self, kind: str, ops: list) -> tuple[list, float, Optional[str]]:
        """(process 0's ops, process 0's clock, what this process asked for that process 0 did not: None
        when nothing). ``kind`` names the call (``"step"``, ``"unload"``); calls in different orders raise.

        Pickled: the messages come from process 0 of the same job, through its coordinator."""
        if self.is_source:
            now = time.monotonic()
            self.channel.send(pickle.dumps((kind, ops, now)))
            return ops, now, None
        their_kind, theirs, now = pickle.loads(self.channel.receive())
        if their_kind == "stop":
            return [("stop", None)], now, None
        if their_kind != kind:
            raise ProcessMismatchError(
                f"process 0 made a {their_kind!r} call where this process made a {kind!r} call: every process of a "
                "multi-process engine makes the same Engine calls in the same order (or runs Engine.follow())")
        return theirs, now, self._unmatched(ops, theirs)

    def stop(self) -> None:
        """Process 0: end the other processes' ``Engine.follow()``."""
        self.channel.send(pickle.dumps(("stop", [], time.monotonic())))

    @staticmethod
    def _unmatched(mine: list, theirs: list) -> Optional[str]:
        """This process's own requests that process 0 did not submit at the same point, described."""
        leader = {arg.request_id: arg for op, arg in theirs if op == "add"}
        bad = [arg for op, arg in mine if op == "add" and not (arg.request_id in leader
                                                               and _same(arg, leader[arg.request_id]))]
        if not bad:
            return None
        r = bad[0]
        return (f"{len(bad)} request(s) submitted here were not submitted by process 0 at the same point (the first: "
                f"{r.request_id}, {len(r.prompt)} prompt tokens, adapter {r.adapter!r}); every process submits the "
                "same requests in the same order, or only process 0 does")
