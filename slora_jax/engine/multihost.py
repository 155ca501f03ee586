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
    """Process 0's inbox, clock and calls, on every process. ``exchange`` is called at the same points
    everywhere: each step, and each Engine call that changes what the scheduler sees or runs a program."""

    def __init__(self, name: str):
        self.channel = HostBroadcast(name)
        self._held: Optional[tuple] = None  # a message ``peek`` received and no ``exchange`` took yet
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

    def exchange(self, kind: str, ops: list, args=None) -> tuple[list, float, object, Optional[str]]:
        """(process 0's ops, process 0's clock, process 0's ``args``, what this process submitted that process
        0 did not: None when nothing). ``kind`` names the call (``"step"``, ``"unload"``, ...), ``args`` its
        arguments; a call that differs from process 0's raises ProcessMismatchError.

        Pickled: the messages come from process 0 of the same job, through its coordinator."""
        if self.is_source:
            now = time.monotonic()
            self.channel.send(pickle.dumps((kind, ops, args, now)))
            return ops, now, args, None
        their_kind, theirs, their_args, now = self._take()
        if their_kind != kind or their_args != args:
            what = f"a {their_kind!r} call" + ("" if their_kind == kind else f" where this process made a {kind!r} call")
            raise ProcessMismatchError(
                f"process 0 made {what}" + (f" with other arguments ({their_args!r:.200})" if their_kind == kind else "")
                + ": every process of a multi-process engine makes the same Engine calls in the same order, or "
                "runs Engine.follow()")
        return theirs, now, their_args, self._unmatched(ops, theirs)

    def peek(self) -> tuple[str, object]:
        """Not process 0: (kind, args) of process 0's next call, left for the ``exchange`` that replays it."""
        if self._held is None:
            self._held = pickle.loads(self.channel.receive())
        return self._held[0], self._held[2]

    def _take(self) -> tuple:
        held, self._held = self._held, None
        return held if held is not None else pickle.loads(self.channel.receive())

    def stop(self) -> None:
        """Process 0: end the other processes' ``Engine.follow()``."""
        self.channel.send(pickle.dumps(("stop", [], None, time.monotonic())))

    def skip(self) -> None:
        """Not process 0: drop the message ``peek`` returned (``stop``)."""
        self._take()

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
