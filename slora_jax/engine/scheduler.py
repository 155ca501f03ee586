"""Scheduler: decides each step's work and owns every KV page.

Each step is "schedule -> prepare inputs -> run -> update". ``schedule`` either admits waiting requests
(a prefill step) or advances every running request by one token (a decode step). Admission checks
the batch size, the prefill token budget, the adapter's pages (loaded now, evicting unreferenced
adapters LRU) and the KV pages. When a decode step needs a KV page and none is left, the most recent
running request is preempted: its pages are freed and it goes back to the front of the queue to be
recomputed later, so nothing crashes and nothing is lost.

The order in which waiting requests are considered is the policy (``policies.py``); everything that
touches pages is here, so a policy can never over-commit the pool. After each decision the adapters of the
requests the policy will admit next are prefetched: their host->device copies start now and complete while
the step runs (see ``AdapterStore.prefetch``). With prefetch on, a request whose adapter is not on the
device when it could be admitted, while other work keeps the device busy, waits one step for its adapter
instead of making the whole batch wait for the copy.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from slora_jax.adapters.store import AdapterStore
from slora_jax.config import EngineConfig
from slora_jax.engine.request import Request, Status
from slora_jax.errors import AdapterError
from slora_jax.memory.pool import KV, UnifiedPagePool


# Admissions a request with a cold adapter may be passed over before it blocks those behind it (``_cold``).
COLD_PATIENCE = 64


@dataclass
class SchedulerOutput:
    kind: str  # "prefill" | "decode" | "idle"
    requests: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # ended during scheduling (abort, failed load)


class Scheduler:
    def __init__(self, econf: EngineConfig, pool: UnifiedPagePool, store: AdapterStore, policy=None):
        from slora_jax.engine.policies import make_policy

        self.econf = econf
        self.pool = pool
        self.store = store
        self.R = pool.layout.page_rows
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.policy = policy or make_policy(econf)
        self.num_preemptions = 0
        self._upcoming: frozenset = frozenset()  # adapters of the requests prefetch expects to admit next
        self.steps = 0  # schedule() calls; adapter loads are timed against it
        self.now = time.monotonic()
        self._seq = 0
        self._blocked: Optional[Request] = None  # the request admission stopped at in the last schedule()

    # ------------------------------------------------------------------ queue
    def add(self, req: Request) -> None:
        req.arrival_seq = self._seq
        self._seq += 1
        self.policy.on_arrival(req, self)
        self.waiting.append(req)

    def abort(self, request_id: str, reason: str = "abort", error: Optional[str] = None) -> Optional[Request]:
        for req in itertools.chain(self.running, self.waiting):
            if req.request_id == request_id:
                self.finish(req, reason, error)
                return req
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def set_policy(self, policy) -> None:
        """Use another policy from now on (e.g. between benchmark runs); only while nothing waits or runs."""
        if self.has_work():
            raise RuntimeError("the scheduling policy can only change while no request is waiting or running")
        self.policy = policy

    # ------------------------------------------------------------------ page ownership
    def kv_blocks(self, req: Request) -> int:
        return len(req.k_pages)

    def ensure_kv(self, req: Request, num_tokens: int) -> bool:
        """Give ``req`` pages for ``num_tokens`` tokens. False (nothing allocated) if they don't fit."""
        need = math.ceil(num_tokens / self.R) - len(req.k_pages)
        if need <= 0:
            return True
        if not self.pool.can_alloc(2 * need):
            # Adapters prefetched for the requests about to be admitted go last: evicting them would only
            # copy them in again a step later.
            self.store.free_unreferenced(2 * need, keep=self._upcoming)
            if not self.pool.can_alloc(2 * need):
                self.store.free_unreferenced(2 * need)
            if not self.pool.can_alloc(2 * need):
                return False
        pages = self.pool.alloc(2 * need, KV)
        req.k_pages = np.concatenate([req.k_pages, pages[:need]])
        req.v_pages = np.concatenate([req.v_pages, pages[need:]])
        return True

    def release(self, req: Request) -> None:
        """Free every page and reference ``req`` holds (the one path for finish, abort and preemption)."""
        if len(req.k_pages):
            self.pool.free(np.concatenate([req.k_pages, req.v_pages]), KV)
        req.k_pages = np.zeros(0, np.int32)
        req.v_pages = np.zeros(0, np.int32)
        if req.holds_adapter:
            self.store.release(req.adapter)
            req.holds_adapter = False

    def finish(self, req: Request, reason: str, error: Optional[str] = None) -> None:
        self.release(req)
        if req.status is Status.RUNNING:
            _remove_identical(self.running, {id(req)})
        elif req.status is Status.WAITING:
            _remove_identical(self.waiting, {id(req)})
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        req.metrics.finish_time = time.monotonic()
        self.policy.on_finish(req, self)

    def preempt(self, req: Request) -> None:
        self.release(req)
        _remove_identical(self.running, {id(req)})
        req.status = Status.WAITING
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        self.policy.on_preempt(req, self)

    # ------------------------------------------------------------------ the decision
    def _begin(self, now: Optional[float]) -> tuple[float, list[Request]]:
        """Start a step: its clock, adapter-load bookkeeping, and the waiting requests whose SLO expired."""
        now = time.monotonic() if now is None else now
        self.now = now  # the clock of this decision, for the policy's hooks
        self.steps += 1
        self.store.begin_step(self.steps)
        late = [r for r in self.policy.expired(self, now) if r.status is Status.WAITING]
        _remove_identical(self.waiting, {id(r) for r in late})  # one pass, however many expire
        for req in late:
            req.status = Status.FINISHED  # already off the queue
            self.finish(req, "abort", "first-token SLO can no longer be met")
        return now, late

    def tick(self, now: Optional[float] = None) -> list[Request]:
        """The scheduling work of a step the engine queues without a decision (the running batch goes on
        as it is): load bookkeeping, SLO expiry and prefetch. Returns the requests it ended."""
        now, late = self._begin(now)
        self._prefetch(now)
        return late

    def schedule(self, now: Optional[float] = None) -> SchedulerOutput:
        now, late = self._begin(now)
        out = SchedulerOutput("idle", finished=list(late))
        admitted = self._admit(out, now)
        if admitted:
            out.kind, out.requests = "prefill", admitted
        elif self.running:
            # Everyone may have been preempted (back to the queue, re-admitted next step): then idle.
            reqs = self._prepare_decode()
            if reqs:
                out.kind, out.requests = "decode", reqs
        elif self.waiting and not out.finished:
            # Nothing runs and the request admission stopped at does not fit even an empty pool: it never will.
            req = self._blocked if self._blocked is not None and not self._blocked.finished else self.waiting[0]
            self.finish(req, "abort", "request does not fit in the page pool")
            out.finished.append(req)
        self._prefetch(now)
        return out

    def _admit(self, out: SchedulerOutput, now: float) -> list[Request]:
        econf = self.econf
        admitted: list[Request] = []
        tokens = 0
        self._blocked = None
        if len(self.running) >= econf.max_batch_size or not self.waiting:
            return admitted
        keep = {r.adapter for r in self.running if r.adapter is not None}  # adapters loads must not evict
        no_room, passed = False, 0
        for req in self.policy.order(self, now):
            if req.status is not Status.WAITING:  # a policy's stale entry: never admit twice
                continue
            if len(self.running) + len(admitted) >= econf.max_batch_size:
                break
            self._blocked = req
            n = req.context_len
            if admitted and tokens + n > econf.max_prefill_tokens:
                break
            if not self._reserve_ok(req, admitted):
                break
            if req.adapter is not None and not req.holds_adapter:
                busy = bool(self.running or admitted)
                cold = self._cold(req, busy, keep, try_copy=not no_room)
                if cold == "defer":
                    keep.add(req.adapter)
                    continue
                if cold == "wait":
                    no_room = True  # room only shrinks during admission: later cold ones need not try
                    req.cold_skips += 1
                    passed += 1
                    if req.cold_skips > COLD_PATIENCE or passed >= self.econf.max_batch_size:
                        break  # passed over long enough (or enough scanned): stop here for this step
                    continue
                self.store.busy = busy
                try:
                    ok = self.store.acquire(req.adapter)
                except AdapterError as e:  # corrupt or removed adapter: this request fails, nobody else
                    self.finish(req, "abort", str(e))
                    out.finished.append(req)
                    continue
                if not ok:
                    break
                req.holds_adapter = True
            if not self.ensure_kv(req, n):
                self.release(req)
                break
            admitted.append(req)
            tokens += n
            self._blocked = None
        _remove_identical(self.waiting, {id(r) for r in admitted})
        for req in admitted:
            req.status = Status.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            self.running.append(req)
            self.policy.on_admit(req, self)
        return admitted

    def _cold(self, req: Request, busy: bool, keep: set, try_copy: bool = True) -> Optional[str]:
        """With prefetch on and a step about to run anyway, a request whose adapter is not on the device yet
        is not admitted now: its copy starts now and overlaps that step, instead of stalling the whole batch.
        Returns None (admit it now), "defer" (its copy or its read from disk is under way) or "wait" (no
        room for its copy yet). Either way the requests behind it may go first: loading it now would evict
        the adapters prefetched for them and stall the step on the copy (in simulation this also cut
        preemptions and first-token latency under page pressure). A request passed over for more than
        COLD_PATIENCE admissions blocks those behind it instead, so that the pages freed by finishing
        requests go to its copy: nobody starves."""
        name = req.adapter
        if not (self.econf.prefetch and busy) or name not in self.store or self.store.ready_for_use(name):
            return None
        if not try_copy:
            return "defer" if self.store.is_resident(name) or self.store.reading(name) else "wait"
        try:
            started = self.store.prefetch(name, reserve=2 * len(self.running) + 2, keep=keep | self._upcoming)
        except AdapterError:
            return None  # the acquire that follows reports it on this request
        # Staged this step (by this or an earlier request), or being read from disk: try again next step.
        if started or self.store.is_resident(name) or self.store.reading(name):
            return "defer"
        return "wait"

    def _reserve_ok(self, req: Request, admitted: list[Request]) -> bool:
        """'reserve' admission: every running request's KV at its maximum length must fit."""
        if self.econf.admission != "reserve":
            return True
        def blocks_at_max(r):
            return math.ceil((r.context_len + r.remaining_tokens) / self.R)
        reserved = sum(2 * blocks_at_max(r) - 2 * len(r.k_pages) for r in self.running + admitted)
        need = 2 * blocks_at_max(req)
        adapter_need = 0
        if req.adapter is not None and not self.store.is_resident(req.adapter):
            adapter_need = self.store.pages_needed(req.adapter)
        # The request's own adapter, if resident, is about to be referenced: not a source of free pages.
        keep = frozenset() if req.adapter is None else {req.adapter}
        avail = self.pool.free_pages + self.store.evictable_pages(exclude=keep)
        return need + adapter_need + reserved <= avail

    def _prepare_decode(self) -> list[Request]:
        """Make sure every running request has a page for the token it is about to write."""
        for req in sorted(self.running, key=lambda r: r.arrival_seq):
            if req.status is not Status.RUNNING:
                continue
            while not self.ensure_kv(req, req.context_len):
                victim = max(self.running, key=lambda r: r.arrival_seq)
                self.preempt(victim)
                if victim is req:
                    break
        return list(self.running)

    def _prefetch(self, now: float) -> None:
        if not self.econf.prefetch or not self.waiting:
            return
        reserve = 2 * len(self.running) + 2  # keep room for the running requests' next KV blocks
        self.store.busy = True
        upcoming = [r.adapter for r in self.policy.peek(self, self.econf.prefetch_depth, now)
                    if r.adapter is not None and r.adapter in self.store]
        self._upcoming = frozenset(upcoming)
        keep = set(upcoming) | {r.adapter for r in self.running if r.adapter is not None}
        for name in dict.fromkeys(upcoming):  # distinct, in admission order
            try:
                if self.store.prefetch(name, reserve=reserve, keep=keep):
                    continue
            except AdapterError:
                continue  # reported when the request itself is admitted
            if not (self.store.is_resident(name) or self.store.reading(name)):
                break  # no room: the ones after it would find none either


def _remove_identical(seq, ids: set) -> None:
    """Drop the items whose id() is in ``ids`` from a list or deque, in place, in one pass.

    By identity: Request is a dataclass whose equality would compare every field of every request passed."""
    if not ids:
        return
    kept = [r for r in seq if id(r) not in ids]
    if len(kept) != len(seq):
        seq.clear()
        seq.extend(kept)
