"""Request: the state of one generation, from arrival to finish. Plain data; the scheduler moves it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from slora_jax.types import RequestMetrics, RequestOutput, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # a request is one object: compared by identity, never field by field
class Request:
    request_id: str
    prompt: list[int]
    adapter: Optional[str]
    sampling: SamplingParams
    seed: int  # the sampling seed actually used (drawn by the engine when the user gave none)
    max_len: int  # context length at which the request stops ("length")
    metrics: RequestMetrics
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    # Device state while running: KV pages (one K and one V page per block of R tokens) and whether
    # this request holds a reference on its adapter.
    k_pages: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    v_pages: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    holds_adapter: bool = False
    computed: int = 0  # context tokens whose K/V are in the pool or written by a step already queued
    pending: int = 0  # tokens sampled by queued steps that the host has not read yet
    cold_skips: int = 0  # admissions passed over while its adapter could not be copied in (scheduler._cold)
    # Scheduler bookkeeping.
    arrival_seq: int = 0
    virtual_start: float = 0.0

    @property
    def context_len(self) -> int:
        """Tokens whose K/V the request needs: prompt + generated."""
        return len(self.prompt) + len(self.output)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.output

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    def tokens(self, start: int, stop: int) -> list[int]:
        """Context tokens [start, stop) without copying the whole context."""
        P = len(self.prompt)
        if stop <= P:
            return self.prompt[start:stop]
        return self.prompt[start:] + self.output[max(start - P, 0):stop - P]

    @property
    def in_prompt(self) -> bool:
        """Context tokens other than the newest one still lack K/V: the next work is a prompt chunk (the
        prompt, or the whole context again after a preemption), not a decode token."""
        return self.computed < self.context_len + self.pending - 1

    @property
    def ends_with_pending(self) -> bool:
        """The tokens still on the device end the request by length: it needs no further step."""
        n = self.pending
        return len(self.output) + n >= self.sampling.max_tokens or self.context_len + n >= self.max_len

    @property
    def remaining_tokens(self) -> int:
        """Upper bound of tokens still to generate."""
        return max(0, min(self.sampling.max_tokens - len(self.output), self.max_len - self.context_len))

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def to_output(self, text: Optional[str] = None) -> RequestOutput:
        return RequestOutput(
            # The prompt never changes after arrival: shared, not copied; the output is a snapshot.
            request_id=self.request_id, prompt_token_ids=self.prompt, token_ids=list(self.output),
            adapter=self.adapter, text=text, finish_reason=self.finish_reason,
            logprobs=list(self.logprobs) if self.sampling.logprobs else None, metrics=self.metrics,
            error=self.error)
