"""The choices of one HTTP request: submitted to the engine, turned into text deltas, merged, cleaned up.

Every engine request a handler starts is aborted when the handler stops caring about it (client gone,
stop string matched, another choice failed), so no request outlives its HTTP exchange.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from slora_jax.server.engine_loop import EngineFailed, EngineLoop, RequestHandle
from slora_jax.server.errors import APIError, unavailable
from slora_jax.server.metrics import ServerMetrics
from slora_jax.server.text import ChoiceText
from slora_jax.types import SamplingParams


@dataclass(frozen=True)
class ChoiceSpec:
    """One engine request: choice ``index`` of the response."""

    index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    stop: tuple[str, ...] = ()


@dataclass
class Delta:
    """What one choice produced since its previous delta. ``logprobs`` aligns with ``token_ids`` when asked."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Optional[str] = None


@dataclass
class ChoiceResult:
    index: int
    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: Optional[str] = None

    def extend(self, d: Delta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason


class ChoiceRun:
    """One choice: its engine request, its text (stop strings applied) and its metrics."""

    def __init__(self, loop: EngineLoop, tokenizer, adapter: Optional[str], model_name: str, spec: ChoiceSpec,
                 metrics: ServerMetrics):
        self.loop, self.adapter, self.model_name, self.spec, self.metrics = loop, adapter, model_name, spec, metrics
        self.text = ChoiceText(tokenizer, spec.stop)
        self.handle: Optional[RequestHandle] = None
        self.generated = 0
        self.finish_reason: Optional[str] = None
        self._t0 = time.monotonic()
        self._t_first: Optional[float] = None
        self._recorded = False

    def start(self) -> None:
        """Submit to the engine; raises the engine's validation errors (RequestError & co.) synchronously."""
        self._t0 = time.monotonic()
        self.handle = self.loop.submit(self.spec.prompt_ids, self.adapter, self.spec.sampling)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Deltas until the choice finishes (the last one has ``finish_reason``)."""
        seen = 0
        while True:
            try:
                out = await self.handle.next()
            except EngineFailed as e:
                self._record("error")
                raise unavailable(str(e)) from e
            new_ids = out.token_ids[seen:]
            new_lps = (out.logprobs or [])[seen:] if self.spec.sampling.logprobs else []
            seen = len(out.token_ids)
            if new_ids and self._t_first is None:
                self._t_first = time.monotonic()
            ids: list[int] = []
            finish = None
            for j, t in enumerate(new_ids):
                ids.append(t)
                if self.text.add(t):
                    finish = "stop"
                    self.handle.abort()  # the engine would go on to max_tokens otherwise
                    break
            lps = [float(x) for x in new_lps[:len(ids)]]
            self.generated += len(ids)
            if finish is None and out.finished:
                if out.finish_reason == "abort" and out.error:
                    self._record("error")
                    raise APIError(503, f"the request was dropped: {out.error}", "service_unavailable",
                                   "request_dropped")
                self.text.finish()
                finish = out.finish_reason
            if finish is not None:
                self.finish_reason = finish
                self._record(finish)
            yield Delta(self.spec.index, self.text.take(final=finish is not None), ids, lps, finish)
            if finish is not None:
                return

    def close(self, reason: str = "disconnect") -> None:
        """Abort the engine request if it is still going (client gone, handler failed, request ended by the
        server); ``reason`` is what metrics count it as if it had not finished."""
        if self.handle is not None and not self.handle.finished:
            self.handle.abort()
        if self.handle is not None:
            self._record(reason)

    def _record(self, reason: str) -> None:
        if self._recorded:
            return
        self._recorded = True
        now = time.monotonic()
        ttft = None if self._t_first is None else self._t_first - self._t0
        self.metrics.observe_choice(self.model_name, reason, len(self.spec.prompt_ids), self.generated, ttft,
                                    now - self._t0 if self._t_first is not None else None)


class Generation:
    """Every choice of one request, merged into one stream of deltas."""

    def __init__(self, runs: list[ChoiceRun], on_close=None):
        self.runs = runs
        self._on_close = on_close
        self._closed = False
        self._merged: "asyncio.Queue[Delta | BaseException]" = asyncio.Queue()
        self.failure: Optional[APIError] = None

    def fail(self, error: APIError) -> None:
        """End the request with ``error`` (server shutting down, deadline passed): whoever reads its deltas
        gets the error next, and its engine requests are aborted."""
        if self.failure is None and not self._closed:
            self.failure = error
            self._merged.put_nowait(error)

    def start(self) -> None:
        """Submit every choice; if one is refused, the ones already queued are aborted and the error raised."""
        try:
            for run in self.runs:
                run.start()
        except BaseException:
            self.close()
            raise

    async def deltas(self) -> AsyncIterator[Delta]:
        merged = self._merged

        async def pump(run: ChoiceRun) -> None:
            try:
                async for d in run.deltas():
                    merged.put_nowait(d)
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                merged.put_nowait(e)

        tasks = [asyncio.create_task(pump(r)) for r in self.runs]
        remaining = len(self.runs)
        try:
            while remaining:
                item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    remaining -= 1
        finally:
            for t in tasks:
                t.cancel()
            self.close()

    async def collect(self) -> list[ChoiceResult]:
        """Run to completion; results by choice index."""
        results = {r.spec.index: ChoiceResult(r.spec.index, len(r.spec.prompt_ids)) for r in self.runs}
        async for d in self.deltas():
            results[d.index].extend(d)
        return [results[i] for i in sorted(results)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for run in self.runs:
            run.close("error" if self.failure is not None else "disconnect")
        if self._on_close is not None:
            self._on_close()
