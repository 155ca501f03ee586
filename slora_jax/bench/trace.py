"""The S-LoRA synthetic workload, and replay of recorded traces (JSONL).

The synthetic trace draws exactly what S-LoRA's public ``benchmarks/trace.py`` draws, in the same order from
numpy's legacy generator seeded with ``seed`` (42 in the paper), so the same flags give the same requests:

  adapter index = floor(n * numpy.random.power(alpha))   (alpha = 1: uniform; smaller alpha: more skewed)
  input length  = numpy.random.randint(a, b)             (uniform in [a, b): the upper bound is excluded)
  output length = numpy.random.randint(a, b)
  gaps          = numpy.random.gamma(1 / cv^2, cv^2 / R)  (a Gamma process of rate R and coefficient of
                                                           variation cv; cv = 1 is Poisson)
  arrival i     = gap 0 + ... + gap i

A recorded trace is one JSON object a line: ``{"arrival_s": 0.12, "adapter": "name" | 3 | null,
"input_len": 100, "output_len": 50}``; ``adapter`` is an adapter name, an index into the adapter list, or
null for the base model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from slora_jax.errors import ConfigError

AdapterRef = Union[int, str, None]


@dataclass(frozen=True)
class TraceRequest:
    """One request of a workload: when it arrives (seconds from the start), for which adapter, how long."""

    arrival_s: float
    adapter: AdapterRef  # index into the run's adapter list, a registered name, or None (base model)
    input_len: int
    output_len: int


def _check_range(rng, what: str) -> tuple[int, int]:
    if len(rng) != 2:
        raise ConfigError(f"{what} needs two integers a b, got {list(rng)!r}")
    a, b = rng
    if isinstance(a, bool) or isinstance(b, bool) or int(a) != a or int(b) != b or not 1 <= a < b:
        raise ConfigError(f"{what} must be integers with 1 <= a < b (lengths are drawn from [a, b)), got {a} {b}")
    return int(a), int(b)


def synthetic_trace(num_adapters: int, alpha: float, req_rate: float, cv: float, duration: float,
                    input_range: Sequence[int], output_range: Sequence[int], seed: int = 42) -> list[TraceRequest]:
    """S-LoRA's synthetic trace: ``int(req_rate * duration)`` requests. ``num_adapters = 0`` gives base-model
    requests (adapter None). Returns requests sorted by arrival."""
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, (int, np.integer)) or num_adapters < 0:
        raise ConfigError(f"--num-adapters must be an integer >= 0, got {num_adapters!r}")
    for name, v in (("--alpha", alpha), ("--req-rate", req_rate), ("--cv", cv), ("--duration", duration)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{name} must be a positive number, got {v!r}")
    lo_in, hi_in = _check_range(input_range, "--input-range")
    lo_out, hi_out = _check_range(output_range, "--output-range")
    rs = np.random.RandomState(seed)  # numpy's legacy global generator, as np.random.seed(seed) sets it
    total = int(req_rate * duration)
    probs = rs.power(alpha, total)
    ind = (probs * max(num_adapters, 1)).astype(int)
    input_lens = rs.randint(lo_in, hi_in, total)
    output_lens = rs.randint(lo_out, hi_out, total)
    intervals = rs.gamma(1.0 / (cv * cv), cv * cv / req_rate, total)
    arrivals = np.cumsum(intervals)
    return [TraceRequest(float(arrivals[i]), int(ind[i]) if num_adapters > 0 else None,
                         int(input_lens[i]), int(output_lens[i])) for i in range(total)]


def write_trace(path, trace: Sequence[TraceRequest]) -> Path:
    """Save a trace as JSONL (one request a line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in trace:
            f.write(json.dumps(asdict(r)) + "\n")
    return path


def read_trace(path) -> list[TraceRequest]:
    """Load a JSONL trace; raises ConfigError naming the line of anything malformed. Sorted by arrival."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trace file {path} does not exist")
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not JSON ({e})") from None
            out.append(_parse(obj, f"{path}:{lineno}"))
    if not out:
        raise ConfigError(f"trace file {path} holds no requests")
    return sorted(out, key=lambda r: r.arrival_s)


def _parse(obj, where: str) -> TraceRequest:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: each line must be a JSON object")
    missing = [k for k in ("arrival_s", "input_len", "output_len") if k not in obj]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)} "
                          "(need arrival_s, adapter, input_len, output_len)")
    t, n_in, n_out = obj["arrival_s"], obj["input_len"], obj["output_len"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ConfigError(f"{where}: arrival_s must be a number >= 0, got {t!r}")
    for k, v in (("input_len", n_in), ("output_len", n_out)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: {k} must be an integer >= 1, got {v!r}")
    adapter = obj.get("adapter")
    if adapter is not None and (isinstance(adapter, bool) or not isinstance(adapter, (int, str))
                                or (isinstance(adapter, int) and adapter < 0) or adapter == ""):
        raise ConfigError(f"{where}: adapter must be a name, an index >= 0 or null, got {adapter!r}")
    return TraceRequest(float(t), adapter, n_in, n_out)


def resolve_adapters(trace: Sequence[TraceRequest], names: Sequence[str]) -> list[Optional[str]]:
    """The adapter name of each request: indices go through ``names``; names must be among them."""
    known = set(names)
    out = []
    for i, r in enumerate(trace):
        a = r.adapter
        if a is None:
            out.append(None)
        elif isinstance(a, str):
            if a not in known:
                raise ConfigError(f"trace request {i} names adapter {a!r}, which is not registered "
                                  f"({len(names)} adapters are)")
            out.append(a)
        else:
            if a >= len(names):
                raise ConfigError(f"trace request {i} uses adapter index {a}, but only {len(names)} adapters exist")
            out.append(names[a])
    return out


def with_base_model(trace: Sequence[TraceRequest]) -> list[TraceRequest]:
    """The same arrivals and lengths, every request on the base model (the no-adapter baseline)."""
    return [TraceRequest(r.arrival_s, None, r.input_len, r.output_len) for r in trace]


def prompt_tokens(trace: Sequence[TraceRequest], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random prompt token ids of each request's input length, in [3, vocab) (ids 0-2 are often special)."""
    rng = np.random.default_rng(seed)
    lo = 3 if vocab_size > 4 else 0
    return [rng.integers(lo, vocab_size, r.input_len).tolist() for r in trace]
