"""Scheduling policies: the order in which waiting requests are tried for admission, and which are dropped.

A policy never touches pages: the Scheduler admits requests in the policy's order while they fit, so no
policy can over-commit the pool. ``order`` may be lazy (a generator). The Scheduler stops pulling as soon
as a request does not fit, and every request it pulled before that was admitted (or failed for good, or
waits one step for its adapter's copy), so a generator may assume it joined the batch being built.
``sched.now`` is the clock of the current decision.

Hooks, all called by the Scheduler:
  on_arrival(req, sched)   ``req`` joined the back of ``sched.waiting``
  on_admit(req, sched)     it moved from ``sched.waiting`` to ``sched.running``
  on_preempt(req, sched)   it went back to the front of ``sched.waiting`` (its pages freed)
  on_finish(req, sched)    it ended (length, stop, abort), from waiting or running
  order(sched, now)        waiting requests in the order to try them (an iterable over a snapshot)
  peek(sched, n, now)      the next ``n`` requests ``order`` would give (what prefetch loads for)
  expired(sched, now)      waiting requests to drop now (first-token SLO)

Policies:
  fcfs     arrival order; preempted requests first.
  cluster  S-LoRA's adapter clustering: once the batch holds ``cluster_k`` adapters, waiting requests of
           adapters already in the batch go first (fewer distinct adapters per batch), then the rest FCFS.
  slo      S-LoRA's early abort: drop waiting requests that can no longer get their first token within
           ``slo_first_token_s``; when arrivals outrun service, serve the newest first so they still can.
  fair     Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language Models"): one queue and
           one counter of served tokens (input x1, output x2) per adapter; the least-served backlogged
           adapter goes next, so a rare adapter is never starved by a popular one.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from typing import Iterable, Iterator, Optional

from slora_jax.config import EngineConfig
from slora_jax.errors import ConfigError


class Policy:
    """Base policy: every hook is a no-op; subclasses define ``order``."""

    name = "base"

    def __init__(self, econf: Optional[EngineConfig] = None):
        self.econf = econf or EngineConfig()

    def on_arrival(self, req, sched) -> None:
        pass

    def on_admit(self, req, sched) -> None:
        pass

    def on_preempt(self, req, sched) -> None:
        pass

    def on_finish(self, req, sched) -> None:
        pass

    def order(self, sched, now: float) -> Iterable:
        raise NotImplementedError

    def peek(self, sched, n: int, now: Optional[float] = None) -> list:
        now = time.monotonic() if now is None else now
        return list(itertools.islice(self.order(sched, now), n))

    def expired(self, sched, now: float) -> list:
        return []


class FCFS(Policy):
    """First come, first served (preempted requests sit at the front of the queue)."""

    name = "fcfs"

    def order(self, sched, now: float) -> Iterable:
        return list(sched.waiting)


class Cluster(Policy):
    """Adapter clustering: with ``k`` adapters in the batch, requests of those adapters go first."""

    name = "cluster"

    def __init__(self, econf: Optional[EngineConfig] = None):
        super().__init__(econf)
        self.k = self.econf.cluster_k

    def order(self, sched, now: float) -> Iterator:
        active = {r.adapter for r in sched.running if r.adapter is not None}
        deferred = []
        for req in list(sched.waiting):
            a = req.adapter
            # Base-model requests add no adapter to the batch: never deferred.
            if a is None or a in active or len(active) < self.k:
                if a is not None:
                    active.add(a)  # pulled again only if admitted, so the batch now holds ``a``
                yield req
            else:
                deferred.append(req)
        # Capacity left once the batch's own adapters are served: the rest, FCFS (as S-LoRA falls back).
        yield from deferred


class SLOAware(Policy):
    """Early abort on a first-token SLO, and newest-first service while arrivals outrun service."""

    name = "slo"

    def __init__(self, econf: Optional[EngineConfig] = None):
        super().__init__(econf)
        if self.econf.slo_first_token_s is None:
            raise ConfigError("scheduler='slo' needs slo_first_token_s (e.g. 6.0)")
        self.slo = float(self.econf.slo_first_token_s)
        self.step_estimate = 0.0  # EMA of the time between busy scheduling calls (one engine step)
        self._last_call: Optional[float] = None
        self._last_busy = False
        self._admits: deque = deque()  # admission times within the last ``slo`` seconds
        self._first_seen: Optional[float] = None
        self.newest_first = False  # the last decision, for inspection
        self.num_expired = 0

    @staticmethod
    def _fresh(req) -> bool:
        """Not yet given a first token (a preempted request already has one: its SLO is settled)."""
        return req.metrics.first_token_time is None

    def on_arrival(self, req, sched) -> None:
        if self._first_seen is None:
            self._first_seen = req.metrics.arrival_time

    def on_admit(self, req, sched) -> None:
        self._admits.append(sched.now)

    def service_rate(self, now: float) -> float:
        """Admissions per second over the last SLO window (or since the first arrival, if sooner)."""
        while self._admits and self._admits[0] < now - self.slo:
            self._admits.popleft()
        if self._first_seen is None:
            return 0.0
        window = min(self.slo, max(now - self._first_seen, 1e-3))
        return len(self._admits) / window

    def overloaded(self, sched, now: float, fresh: Optional[int] = None) -> bool:
        """FCFS would make the newest waiting request miss: more than one SLO's worth of service queued."""
        if fresh is None:
            fresh = sum(1 for r in sched.waiting if self._fresh(r))
        return fresh > self.service_rate(now) * self.slo

    def expired(self, sched, now: float) -> list:
        if self._last_call is not None and self._last_busy:
            dt = now - self._last_call
            self.step_estimate = dt if self.step_estimate == 0.0 else 0.8 * self.step_estimate + 0.2 * dt
        self._last_call = now
        self._last_busy = bool(sched.running or sched.waiting)
        # A first token needs at least one more step: drop requests whose deadline falls before it ends.
        late = [r for r in sched.waiting
                if self._fresh(r) and now + self.step_estimate - r.metrics.arrival_time >= self.slo]
        self.num_expired += len(late)
        return late

    def order(self, sched, now: float) -> Iterable:
        resumed, fresh = [], []
        for r in sched.waiting:
            (fresh if self._fresh(r) else resumed).append(r)
        self.newest_first = self.overloaded(sched, now, len(fresh))
        if self.newest_first:
            fresh.reverse()
        return resumed + fresh


class VirtualTokenCounter(Policy):
    """Fair sharing across adapters: least-served backlogged adapter first (VTC)."""

    name = "fair"

    def __init__(self, econf: Optional[EngineConfig] = None, input_price: float = 1.0, output_price: float = 2.0,
                 weights: Optional[dict] = None):
        super().__init__(econf)
        self.input_price = float(input_price)
        self.output_price = float(output_price)
        self.weights = dict(weights or self.econf.extra.get("fair_weights", {}))
        self.counters: dict = {}  # adapter (None = base model) -> weighted virtual tokens served
        self.queues: dict = {}  # adapter -> deque of its waiting requests, front first
        self._charged: dict[str, int] = {}  # request id -> output tokens already counted
        self._last_served = None
        self._ties = itertools.count()

    def _w(self, adapter) -> float:
        return float(self.weights.get(adapter, 1.0))

    def _lift(self, adapter) -> None:
        """An adapter that becomes backlogged cannot bank the time it was idle."""
        others = [self.counters[a] for a, q in self.queues.items() if q and a != adapter]
        floor = min(others) if others else self.counters.get(self._last_served, 0.0)
        self.counters[adapter] = max(self.counters.get(adapter, 0.0), floor)

    def on_arrival(self, req, sched) -> None:
        q = self.queues.setdefault(req.adapter, deque())
        if not q:
            self._lift(req.adapter)
        q.append(req)

    def on_preempt(self, req, sched) -> None:
        self.queues.setdefault(req.adapter, deque()).appendleft(req)
        self.counters.setdefault(req.adapter, 0.0)

    def on_admit(self, req, sched) -> None:
        q = self.queues.get(req.adapter)
        if q:
            _remove(q, req)
        if req.request_id not in self._charged:  # a recomputed (preempted) request is not charged twice
            self.counters[req.adapter] = self.counters.get(req.adapter, 0.0) + \
                self.input_price * len(req.prompt) / self._w(req.adapter)
            self._charged[req.request_id] = len(req.output)
        self._last_served = req.adapter

    def on_finish(self, req, sched) -> None:
        q = self.queues.get(req.adapter)
        if q:
            _remove(q, req)
        self._charge(req)
        self._charged.pop(req.request_id, None)

    def _charge(self, req) -> None:
        done = self._charged.get(req.request_id)
        if done is not None and len(req.output) > done:
            self.counters[req.adapter] += self.output_price * (len(req.output) - done) / self._w(req.adapter)
            self._charged[req.request_id] = len(req.output)

    def order(self, sched, now: float) -> Iterator:
        for r in sched.running:  # output tokens are charged as they are generated
            self._charge(r)
        heap = []
        for a, q in self.queues.items():
            if q:
                heap.append((self.counters.get(a, 0.0), q[0].arrival_seq, next(self._ties), a, tuple(q), 0))
        heapq.heapify(heap)
        while heap:
            c, _, _, a, snap, pos = heapq.heappop(heap)
            req = snap[pos]
            yield req
            # Pulled again only if ``req`` was admitted: charge its prompt locally (on_admit does it for real).
            if req.request_id not in self._charged:
                c += self.input_price * len(req.prompt) / self._w(a)
            if pos + 1 < len(snap):
                heapq.heappush(heap, (c, snap[pos + 1].arrival_seq, next(self._ties), a, snap, pos + 1))


def _remove(q: deque, req) -> None:
    """Remove ``req`` by identity (dataclass equality would compare every field of every request before it)."""
    for i, r in enumerate(q):
        if r is req:
            del q[i]
            return


POLICIES = {"fcfs": FCFS, "cluster": Cluster, "slo": SLOAware, "fair": VirtualTokenCounter}


def make_policy(econf: EngineConfig) -> Policy:
    """The policy named by ``econf.scheduler``."""
    try:
        cls = POLICIES[econf.scheduler]
    except KeyError:
        raise ConfigError(f"scheduler {econf.scheduler!r} is not available (have: {', '.join(POLICIES)})") from None
    return cls(econf)
