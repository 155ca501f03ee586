"""Scheduling policies: the order in which waiting requests are considered for admission.

A policy only orders and (for SLOs) drops requests; the Scheduler does every page check, so no policy
can over-commit the pool.
"""

from __future__ import annotations

from typing import Iterable

from slora_jax.config import EngineConfig
from slora_jax.errors import ConfigError


class FCFS:
    """First come, first served (preempted requests go back to the front)."""

    def on_arrival(self, req, sched) -> None:
        pass

    def on_admit(self, req, sched) -> None:
        pass

    def on_finish(self, req, sched) -> None:
        pass

    def order(self, sched, now: float) -> Iterable:
        return list(sched.waiting)

    def peek(self, sched, n: int) -> list:
        return [r for _, r in zip(range(n), sched.waiting)]

    def expired(self, sched, now: float) -> list:
        return []


POLICIES = {"fcfs": FCFS}


def make_policy(econf: EngineConfig):
    try:
        cls = POLICIES[econf.scheduler]
    except KeyError:
        raise ConfigError(f"scheduler {econf.scheduler!r} is not available (have: {', '.join(POLICIES)})") from None
    return cls(econf) if econf.scheduler != "fcfs" else cls()
