"""The plain data the public API takes and returns: sampling parameters, outputs, adapter info."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from slora_jax.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # report each generated token's log-probability

    def __post_init__(self):
        # Normalise lists from JSON/kwargs so the object stays hashable and comparable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def validate(self, vocab_size: int) -> None:
        """Raise RequestError naming the first bad value."""
        def bad(msg):
            raise RequestError(f"invalid sampling parameter: {msg}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not (0.0 <= float(self.temperature) < float("inf")):
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < float(self.top_p) <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad(f"seed must be an integer or None, got {self.seed!r}")
        for t in self.stop_token_ids:
            if not (0 <= t < vocab_size):
                bad(f"stop token id {t} is outside the vocabulary [0, {vocab_size})")


@dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    num_preemptions: int = 0

    @property
    def first_token_latency(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> Optional[float]:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class RequestOutput:
    """A request's result so far (cumulative): generated token ids only, not the prompt."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    adapter: Optional[str] = None
    text: Optional[str] = None
    finish_reason: Optional[str] = None  # None while running; "length" | "stop" | "abort"
    logprobs: Optional[list[float]] = None
    metrics: Optional[RequestMetrics] = None
    error: Optional[str] = None  # why a request ended with "abort", when it was not the caller's abort

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class AdapterInfo:
    """What the engine knows about one registered adapter, and where its weights are now."""

    name: str
    path: str
    rank: int  # largest rank over modules and layers
    ranks: dict = field(default_factory=dict)  # module -> largest rank of that module
    target_modules: tuple[str, ...] = ()
    location: str = "disk"  # "disk" | "host" | "device"
    device_pages: int = 0
    host_bytes: int = 0
    loads: int = 0  # host -> device transfers so far
