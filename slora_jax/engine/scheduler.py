"""Scheduler: decides each step's work and owns every KV page.

Each step is "schedule -> prepare inputs -> run -> update", and one step program runs decode tokens and
prompt chunks together (chunked prefill, as vLLM v1 and Sarathi): every running request past its prompt
gets one decode token, prompts in progress get their next chunk, and waiting requests are admitted with
what is left of the step's token budget; a prompt longer than that continues in later steps, its K/V
already in the pool. Admission checks the batch size, the adapter's pages (loaded now, evicting
unreferenced adapters LRU), the KV pages of its first chunk and a free-page watermark. When a decode
token needs a KV page and none is left, the most recent running request is preempted: its pages are
freed and it goes back to the front of the queue to be recomputed later, so nothing crashes and nothing
is lost. The host may schedule step n+1 before it has read step n (``Request.pending``).

The order in which waiting requests are considered is the policy (``policies.py``); everything that
touches pages is here, so a policy can never over-commit the pool. After each decision the adapters of the
requests the policy will admit next are prefetched: their host->device copies start now and complete while
the step runs (see ``AdapterStore.prefetch``). With prefetch on, a request whose adapter is not on the
device when it could be admitted, while other work keeps the device busy, waits one step for its adapter
instead of making the whole batch wait for the copy.
"""

from __future__ import annotations

import bisect
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
class Chunk:
    """Prompt tokens [start, start + count) of a request's context, computed in one step."""

    req: Request
    start: int
    count: int
    samples: bool  # the chunk ends the context: the step samples the request's next token


@dataclass
class SchedulerOutput:
    decode: list[Request] = field(default_factory=list)  # one token each, at position req.computed - 1
    chunks: list[Chunk] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # ended during scheduling (abort, failed load)

    @property
    def kind(self) -> str:
        """"mixed" (prompt chunks, with or without decode tokens) | "decode" | "idle"."""
        return "mixed" if self.chunks else ("decode" if self.decode else "idle")

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.count for c in self.chunks)

    @property
    def requests(self) -> list[Request]:
        """Every request with work in this step."""
        return self.decode + [c.req for c in self.chunks]

    @property
    def sampled(self) -> list[Request]:
        """Requests that get a new token from this step: every decode token, and chunks ending a context."""
        return self.decode + [c.req for c in self.chunks if c.samples]


class Scheduler:
    def __init__(self, econf: EngineConfig, pool: UnifiedPagePool, store: AdapterStore, policy=None):
        from slora_jax.engine.policies import make_policy

        self.econf = econf
        self.pool = pool
        self.store = store
        self.R = pool.layout.page_rows
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order (kept so on admission): oldest served first
        self.policy = policy or make_policy(econf)
        self.num_preemptions = 0
        self._upcoming: frozenset = frozenset()  # adapters of the requests prefetch expects to admit next
        self.steps = 0  # schedule() calls; adapter loads are timed against it
        self.now = time.monotonic()
        self._seq = 0
        self._blocked: Optional[Request] = None  # the request admission stopped at in the last schedule()
        # Tokens of one step: every decode token plus prompt chunks. At least twice the batch, so that
        # prompts progress in a full batch.
        self.token_budget = max(econf.max_prefill_tokens, 2 * econf.max_batch_size)
        # Free pages a new admission must leave (the running requests' next KV blocks): without it, a
        # full batch admits until the pool is full and then preempts, recomputing what it just admitted.
        self.watermark = max(2, int(econf.kv_watermark * pool.total_pages))

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
        req.computed = 0
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

    def schedule(self, now: Optional[float] = None) -> SchedulerOutput:
        """One step's work: a decode token for every running request past its prompt, the chunks that
        continue prompts being computed, then new admissions, within ``token_budget`` tokens.

        The step before this one may still be on the device: a request's ``pending`` tokens are sampled
        there and not read yet. Its decode token here is then that pending token (the engine takes it
        from the device), and a request whose pending token ends it by length gets no more work."""
        now, late = self._begin(now)
        out = SchedulerOutput(finished=list(late))
        budget = self.token_budget
        for req in self._prepare_running():
            if req.status is not Status.RUNNING:
                continue  # preempted for an older request's chunk below
            if req.in_prompt:
                if budget <= 0:
                    continue
                n = min(req.context_len - req.computed, budget)
                # As for decode tokens: the newest request gives its pages back (and is recomputed later),
                # or prompts stuck half-way could wait on each other's pages for ever.
                if not self._kv_or_preempt(req, req.computed + n):
                    continue
                out.chunks.append(Chunk(req, req.computed, n, req.computed + n == req.context_len))
                req.computed += n
                budget -= n
            else:
                out.decode.append(req)
                req.computed += 1
                budget -= 1
        if budget > 0:
            self._admit(out, now, budget)
        for c in out.chunks:
            if c.samples:
                c.req.pending += 1
        for req in out.decode:
            req.pending += 1
        if out.kind == "idle" and not self.running and self.waiting and not out.finished and not self._busy():
            # Nothing runs and the request admission stopped at does not fit even an empty pool: it never will.
            req = self._blocked if self._blocked is not None and not self._blocked.finished else self.waiting[0]
            self.finish(req, "abort", "request does not fit in the page pool")
            out.finished.append(req)
        self._prefetch(now)
        return out

    def _busy(self) -> bool:
        """Some request still has a token on the device: its pages come back once it is read."""
        return any(r.pending for r in itertools.chain(self.running, self.waiting))

    def _admit(self, out: SchedulerOutput, now: float, budget: int) -> None:
        econf = self.econf
        admitted: list[Request] = []
        self._blocked = None
        if len(self.running) >= econf.max_batch_size or not self.waiting:
            return
        keep = {r.adapter for r in self.running if r.adapter is not None}  # adapters loads must not evict
        no_room, passed = False, 0
        for req in self.policy.order(self, now):
            if req.status is not Status.WAITING:  # a policy's stale entry: never admit twice
                continue
            if req.pending:  # preempted with a token still on the device: back once it is read
                continue
            if len(self.running) + len(admitted) >= econf.max_batch_size or budget <= 0:
                break
            self._blocked = req
            if not self._reserve_ok(req, admitted):
                break
            n = min(req.context_len, budget)
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
            if not self._above_watermark(req, n) or not self.ensure_kv(req, n):
                self.release(req)
                break
            admitted.append(req)
            out.chunks.append(Chunk(req, 0, n, n == req.context_len))
            req.computed = n
            budget -= n
            self._blocked = None
        _remove_identical(self.waiting, {id(r) for r in admitted})
        for req in admitted:
            req.status = Status.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            bisect.insort(self.running, req, key=_arrival)  # a recomputed request goes back in its place
            self.policy.on_admit(req, self)

    def _above_watermark(self, req: Request, n: int) -> bool:
        """Whether the K/V pages of ``req``'s first chunk of ``n`` tokens leave ``watermark`` pages free
        (counting adapter pages nobody uses as free; its own adapter is already on the device). Only while
        others run: alone, a request may use it all."""
        if not self.running:
            return True
        need = 2 * math.ceil(n / self.R)
        keep = frozenset() if req.adapter is None else {req.adapter}
        avail = self.pool.free_pages + self.store.evictable_pages(exclude=keep)
        return need + self.watermark <= avail

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

    def _kv_or_preempt(self, req: Request, num_tokens: int) -> bool:
        """Pages for ``num_tokens`` of ``req``, preempting the newest running requests (``req`` itself last) until
        they fit. False when ``req`` was preempted."""
        while not self.ensure_kv(req, num_tokens):
            victim = self.running[-1]  # the newest
            self.preempt(victim)
            if victim is req:
                return False
        return True

    def _prepare_running(self) -> list[Request]:
        """The running requests that get work this step, oldest first. A decode token needs a page for its
        K/V: when none is left the newest request is preempted (recomputed later), oldest ones first served."""
        work = []
        for req in list(self.running):
            if req.status is not Status.RUNNING:
                continue
            if req.in_prompt:
                work.append(req)
                continue
            if req.ends_with_pending:
                continue
            if self._kv_or_preempt(req, req.computed + 1):
                work.append(req)
        return work

    def _prefetch(self, now: float) -> None:
        if not self.econf.prefetch or not self.waiting:
            return
        # Disk reads go far ahead (they only take host memory); device copies only for the next few.
        self.store.read_ahead(r.adapter for r in self.policy.peek(self, self.econf.read_ahead_depth, now)
                              if r.adapter is not None)
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


def _arrival(req: Request) -> int:
    return req.arrival_seq


def _remove_identical(seq, ids: set) -> None:
    """Drop the items whose id() is in ``ids`` from a list or deque, in place, in one pass.

    By identity: Request is a dataclass whose equality would compare every field of every request passed."""
    if not ids:
        return
    kept = [r for r in seq if id(r) not in ids]
    if len(kept) != len(seq):
        seq.clear()
        seq.extend(kept)
