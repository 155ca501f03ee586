"""What a step's sampled tokens do: append to requests, end them (stop, length), and reach callers.

Listeners get a RequestOutput per changed request: every step for streams, once at the end for callers
that read only finished outputs (``generate``). Text is decoded only for those who asked for it:
detokenising every running request every step would cost more than the step itself at large batches.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from slora_jax.engine.request import Request, Status
from slora_jax.types import RequestOutput


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids, finish: Callable[[Request, str], None]):
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_token_ids)
        self.finish = finish  # the scheduler's one path for ending a request
        self.listeners: dict[str, Callable[[RequestOutput], None]] = {}
        self.streaming: set[str] = set()  # requests whose partial outputs carry text
        self.finish_only: set[str] = set()  # requests whose caller reads only the final output
        self.counters = {"generated_tokens": 0, "finished": 0, "aborted": 0}

    def listen(self, request_id: str, listener, stream: bool) -> None:
        self.listeners[request_id] = listener
        (self.streaming if stream else self.finish_only).add(request_id)

    def forget(self, request_id: str) -> None:
        self.listeners.pop(request_id, None)
        self.streaming.discard(request_id)
        self.finish_only.discard(request_id)

    def append(self, rows: list, tokens: np.ndarray, logp: np.ndarray, changed: list) -> None:
        """Take a step's sampled token of every row that samples (rows: (request, samples))."""
        now = time.monotonic()
        for i, (r, samples) in enumerate(rows):
            if not samples:
                continue
            r.pending -= 1
            if r.status is Status.FINISHED:
                continue  # ended while its step was on the device: the token is dropped
            t = int(tokens[i])
            r.output.append(t)
            r.logprobs.append(float(logp[i]))
            self.counters["generated_tokens"] += 1
            if r.metrics.first_token_time is None:
                r.metrics.first_token_time = now
            sp = r.sampling
            if t in sp.stop_token_ids or (not sp.ignore_eos and t in self.eos):
                self.finish(r, "stop")
            elif len(r.output) >= sp.max_tokens or r.context_len >= r.max_len:
                self.finish(r, "length")
            changed.append(r)

    def emit(self, changed: list[Request]) -> list[RequestOutput]:
        outs = []
        seen = set()
        for req in changed:
            rid = req.request_id
            if rid in seen or (not req.finished and rid in self.finish_only):
                continue  # generate() reads finished outputs only: no per-step snapshot for it
            seen.add(rid)
            wants_text = req.finished or rid in self.streaming
            text = self.tokenizer.decode(req.output) if self.tokenizer is not None and wants_text else None
            out = req.to_output(text)
            outs.append(out)
            if req.finished:
                self.counters["finished"] += 1
                if req.finish_reason == "abort":
                    self.counters["aborted"] += 1
            listener: Optional[Callable] = self.listeners.get(rid)
            if listener is not None:
                if req.finished:
                    self.forget(rid)
                listener(out)
        return outs
