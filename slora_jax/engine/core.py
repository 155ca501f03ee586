"""EngineCore: the step loop. schedule -> prepare inputs -> run -> update, with the host one step ahead.

Each ``step()`` queues step n+1 on the device before it reads step n: tokens that step n samples feed
step n+1 on the device (``prev_rows``), and the host reads them one step late, so its scheduling, input
building and output handling overlap the device's work in every state of the batch (full or not,
queue empty or not). The only waits on the device are the reads of outputs.
"""

from __future__ import annotations

import contextlib
import queue
import time
from dataclasses import dataclass
from typing import Optional

import pallas_kernels as pk
from slora_jax.engine.inputs import StepInputs
from slora_jax.engine.outputs import OutputProcessor
from slora_jax.engine.request import Request, Status
from slora_jax.engine.scheduler import Scheduler
from slora_jax.errors import ProcessMismatchError
from slora_jax.model.llama import LORA_GROUPS, LORA_ONE_BLOCK, LORA_TILES, MODULE_GROUP
from slora_jax.types import RequestOutput


@dataclass
class _InFlight:
    out: object  # device outputs (tokens [rows], logprobs [n])
    rows: list  # (request, samples) per sampling row
    done: object = None  # a small device array ready when the step is (for idle-time accounting)


class EngineCore:
    def __init__(self, runner, scheduler: Scheduler, adapters, tables, inputs: StepInputs,
                 outputs: OutputProcessor, async_scheduling: bool = True, shared=None, lora_tiles: bool = False,
                 one_block_rank: int = 0):
        self.runner = runner
        self.scheduler = scheduler
        self.adapters = adapters
        self.tables = tables
        self.inputs = inputs
        self.outputs = outputs
        self.async_scheduling = async_scheduling
        self.lora_tiles = lora_tiles  # decode steps may run MBGMV's tile kernels (``step_variant``)
        # Steps whose adapters all have rank <= this run the one-rank-block programs (0: never; ``step_variant``).
        self.one_block_rank = one_block_rank
        self._ranks: dict = {}  # adapter name -> its largest rank (cached until the adapters change)
        self.inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        # Several processes: process 0's inbox and clock, on every process (multihost.SharedInbox).
        self.shared = shared
        self.now: Optional[float] = None  # the clock of this step's decisions (None: this process's own)
        self.requests: dict[str, Request] = {}
        self._inflight: Optional[_InFlight] = None
        self._registered: Optional[tuple] = None  # LoRA groups the registered adapters target (cached)
        self.trace: Optional[list] = None  # per-step records while tracing (benchmark floors)
        self.counters = {"steps": 0, "mixed_steps": 0, "decode_steps": 0, "prompt_tokens": 0,
                         "prefill_tokens": 0, "host_time_s": 0.0, "step_time_s": 0.0, "exposed_host_s": 0.0}
        self.host_parts = dict.fromkeys(("inbox", "schedule", "inputs", "outputs"), 0.0)

    # ------------------------------------------------------------------ state
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or not self.inbox.empty() or self._inflight is not None

    def lora_groups(self, adapters) -> tuple:
        """The LoRA groups a batch's program runs kernels for: none for a batch without adapters, else the
        groups that the registered adapters target (q/k/v/o adapters launch no MLP kernels). With the words
        ``step_variant`` adds, five variants at most (``Engine.lora_variants``), so every program can be compiled
        ahead (``Engine.precompile``)."""
        if all(a is None for a in adapters):
            return ()
        return self.registered_groups()

    def step_variant(self, mode: str, adapters: list) -> tuple:
        """The LoRA variant of a step's program: its groups (``lora_groups``), with LORA_TILES added to a decode
        step whose tokens share few adapters (``pallas_kernels.lora_decode_grouping``), and LORA_ONE_BLOCK to a
        step whose adapters all fit one rank block (``one_block_rank``)."""
        groups = self.lora_groups(adapters)
        if not groups:
            return groups
        if self.lora_tiles and mode == "decode" and pk.lora_decode_grouping(adapters) == "tiles":
            groups = groups + (LORA_TILES,)
        if self.one_block_rank and max(self._rank(a) for a in set(adapters) - {None}) <= self.one_block_rank:
            groups = groups + (LORA_ONE_BLOCK,)
        return groups

    def _rank(self, name: str) -> int:
        r = self._ranks.get(name)
        if r is None:
            info = self.adapters.info(name)
            r = self._ranks[name] = max([int(info.rank), *(int(v) for v in info.ranks.values())])
        return r

    def registered_groups(self) -> tuple:
        if self._registered is None:
            wanted = set()
            for name in self.adapters.names():
                wanted |= {MODULE_GROUP[m][0] for m in self.adapters.info(name).target_modules}
            self._registered = tuple(g for g in LORA_GROUPS if g in wanted)
        return self._registered

    def adapters_changed(self) -> None:
        """An adapter was registered or removed: the groups the registered ones target may differ, and a name's
        rank."""
        self._registered = None
        self._ranks = {}

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        wait0 = self.runner.device_wait_s
        changed: list[Request] = []
        with self.timed("inbox"):
            self.drain_inbox(changed)
        with self.timed("schedule"):
            sched = self.scheduler.schedule(self.now)
        changed.extend(sched.finished)
        prev, self._inflight = self._inflight, None
        queued_at = None
        if sched.kind != "idle":
            try:
                self._inflight = self._dispatch(sched, prev)
            except BaseException:
                self._inflight = prev  # still on the device: read by the next step (or drain)
                raise
            queued_at = time.perf_counter()
        if prev is not None:
            # The device had work queued behind ``prev`` unless ``prev`` had already finished by the time the
            # next step was queued: then the host time of this step up to that point is time the device
            # may have waited for the host.
            idle = queued_at is None or prev.done.is_ready()
            tokens, logp = self.runner.collect(prev.out)
            if idle:
                self.counters["exposed_host_s"] += (queued_at or time.perf_counter()) - t0
            with self.timed("outputs"):
                self.outputs.append(prev.rows, tokens, logp, changed)
        elif queued_at is not None:
            self.counters["exposed_host_s"] += queued_at - t0  # nothing was queued before this step
        if self._inflight is not None and not self.async_scheduling:
            cur, self._inflight = self._inflight, None
            tokens, logp = self.runner.collect(cur.out)
            with self.timed("outputs"):
                self.outputs.append(cur.rows, tokens, logp, changed)
        with self.timed("outputs"):
            for r in changed:
                if r.finished:
                    self.requests.pop(r.request_id, None)
            outs = self.outputs.emit(changed)
        dt = time.perf_counter() - t0
        self.counters["step_time_s"] += dt
        self.counters["host_time_s"] += dt - (self.runner.device_wait_s - wait0)
        return outs

    def _dispatch(self, sched, prev: Optional[_InFlight]) -> _InFlight:
        kind = sched.kind
        self.counters["steps"] += 1
        self.counters[kind + "_steps"] += 1
        self.counters["prefill_tokens"] += sum(c.count for c in sched.chunks)
        with self.timed("inputs"):
            prev_row = {} if prev is None else {id(r): i for i, (r, s) in enumerate(prev.rows) if s}
            mode, inp, samp, rows = self.inputs.build(sched, prev_row)
            groups = self.step_variant(mode, [r.adapter for r, _ in rows])
        out = self.runner.dispatch(mode, self.tables, inp, samp, lora_groups=groups,
                                   prev_tokens=None if prev is None else prev.out[0])
        if self.trace is not None:
            self.trace.append(dict(
                mode=mode, tokens=int(inp["tokens"].shape[0]), decode_tokens=len(sched.decode),
                prompt_tokens=sum(c.count for c in sched.chunks),
                # Keys each query token attends: its position + 1 (a chunk's tokens, summed).
                attended=int(sum(r.computed for r in sched.decode)
                             + sum(c.count * c.start + c.count * (c.count + 1) // 2 for c in sched.chunks)),
                # K/V rows a step must read at least once: every decode row's context, every chunk's.
                kv_read=int(sum(r.computed for r in sched.decode) + sum(c.start + c.count for c in sched.chunks)),
                sampled=len(rows), adapters=sorted({r.adapter for r, _ in rows} - {None}), lora_groups=list(groups),
                # When the step was queued: with the host ahead, the step queued after it waits for its
                # predecessor, so these times pace the device (queued_at[k+2] - queued_at[k+1] ~ step k).
                queued_at=time.perf_counter()))
        return _InFlight(out, rows, out[1])

    def drain(self, changed: list) -> None:
        """Read the step still on the device, if any (before a synchronous operation on the pool)."""
        if self._inflight is not None:
            cur, self._inflight = self._inflight, None
            tokens, logp = self.runner.collect(cur.out)
            self.outputs.append(cur.rows, tokens, logp, changed)

    def drain_inbox(self, changed: list, kind: str = "step", args=None):
        """Apply the queued requests and aborts. With several processes, process 0's: ``kind`` and ``args``
        name the Engine call that drains (the same on every process); returns process 0's ``args``."""
        ops = []
        while True:
            try:
                ops.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        unmatched = None
        if self.shared is not None:
            ops, self.now, args, unmatched = self.shared.exchange(kind, ops, args)
        for op, arg in ops:
            if op == "add":
                if arg.adapter is not None and arg.adapter not in self.adapters:
                    # Unloaded between add_request and now: fail this request only.
                    self.requests[arg.request_id] = arg
                    arg.status = Status.FINISHED
                    arg.finish_reason, arg.error = "abort", f"adapter {arg.adapter!r} was unloaded"
                    arg.metrics.finish_time = time.monotonic()
                    changed.append(arg)
                    continue
                self.requests[arg.request_id] = arg
                self.counters["prompt_tokens"] += len(arg.prompt)
                self.scheduler.add(arg)
            else:
                req = self.scheduler.abort(arg)
                if req is not None:
                    changed.append(req)
        if unmatched is not None:  # after process 0's ops: this process stays in step with the others
            raise ProcessMismatchError(unmatched)
        return args

    def agree(self, kind: str, args=None):
        """With several processes, process 0's ``args`` of an Engine call that every process makes (``kind``)
        without draining the inbox; ``args`` as they are in one process."""
        if self.shared is None:
            return args
        return self.shared.exchange(kind, [], args)[2]

    @contextlib.contextmanager
    def timed(self, part: str):
        """Add the host time of the block to ``stats()["host_breakdown_s"][part]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.host_parts[part] += time.perf_counter() - t0
