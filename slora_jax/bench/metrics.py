"""Serving metrics as the S-LoRA paper (and its public benchmark code) defines them.

* throughput: requests finished (not aborted) per second of the run, and their generated tokens per second;
  the run lasts from the trace's start to the last finish (or the time limit).
* latency: finish - arrival; first-token latency: first token - arrival. Arrival is the trace's scheduled
  time, so time a request spent before the engine saw it counts. Averages and percentiles over finished
  requests.
* SLO attainment: share of *all* requests whose first token came within ``slo`` seconds (aborted and
  unfinished ones count as misses).
* user satisfaction: mean over all requests of ``1 - (t / slo)^2`` for a first-token latency t < slo, else 0;
  aborted and unfinished requests score 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class RequestRecord:
    """What happened to one trace request. Times are seconds from the run's start."""

    index: int
    adapter: Optional[str]
    input_len: int
    output_len: int
    arrival_s: float
    first_token_s: Optional[float] = None
    finish_s: Optional[float] = None
    finish_reason: Optional[str] = None  # "length" | "stop" | "abort" | None (unfinished at the time limit)
    generated: int = 0
    error: Optional[str] = None

    @property
    def completed(self) -> bool:
        return self.finish_reason in ("length", "stop")

    @property
    def latency(self) -> Optional[float]:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def first_token_latency(self) -> Optional[float]:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


def satisfaction(first_token_latency: Optional[float], slo: float) -> float:
    """1 - (t/slo)^2 for t < slo, else 0 (None: never served)."""
    t = first_token_latency
    if t is None or t >= slo:
        return 0.0
    return 1.0 - (max(t, 0.0) / slo) ** 2


def attained(first_token_latency: Optional[float], slo: float) -> bool:
    return first_token_latency is not None and first_token_latency < slo


def _stats(values: Sequence[float], prefix: str) -> dict:
    if not values:
        return {f"{prefix}_avg_s": None, f"{prefix}_p50_s": None, f"{prefix}_p90_s": None, f"{prefix}_p99_s": None}
    v = np.asarray(values, dtype=np.float64)
    return {f"{prefix}_avg_s": float(v.mean()), f"{prefix}_p50_s": float(np.percentile(v, 50)),
            f"{prefix}_p90_s": float(np.percentile(v, 90)), f"{prefix}_p99_s": float(np.percentile(v, 99))}


def summarize(records: Sequence[RequestRecord], total_time_s: float, slo: float) -> dict:
    """Every metric of one run (see the module docstring)."""
    if not math.isfinite(total_time_s) or total_time_s <= 0:
        raise ValueError(f"total_time_s must be positive, got {total_time_s!r}")
    n = len(records)
    done = [r for r in records if r.completed]
    aborted = [r for r in records if r.finish_reason == "abort"]
    unfinished = [r for r in records if r.finish_reason is None]
    out = {
        "num_requests": n,
        "finished": len(done),
        "aborted": len(aborted),
        "unfinished": len(unfinished),
        "total_time_s": float(total_time_s),
        "throughput_req_s": len(done) / total_time_s,
        "throughput_tok_s": sum(r.generated for r in done) / total_time_s,
        "input_tok_s": sum(r.input_len for r in done) / total_time_s,
    }
    out.update(_stats([r.latency for r in done], "latency"))
    out.update(_stats([r.first_token_latency for r in done], "first_token_latency"))
    out["per_output_token_latency_avg_s"] = (float(np.mean([r.latency / max(r.output_len, 1) for r in done]))
                                             if done else None)
    # Over every request: misses include aborted and unfinished ones.
    ftl = [r.first_token_latency if r.completed else None for r in records]
    out["slo_s"] = float(slo)
    out["slo_attainment"] = float(np.mean([attained(t, slo) for t in ftl])) if n else None
    out["user_satisfaction"] = float(np.mean([satisfaction(t, slo) for t in ftl])) if n else None
    return out


def latency_cdf(records: Sequence[RequestRecord], which: str = "latency") -> tuple[np.ndarray, np.ndarray]:
    """(sorted latencies, cumulative share of finished requests) for plotting."""
    vals = sorted(getattr(r, which) for r in records if r.completed and getattr(r, which) is not None)
    if not vals:
        return np.zeros(0), np.zeros(0)
    v = np.asarray(vals)
    return v, np.arange(1, len(v) + 1) / len(v)
