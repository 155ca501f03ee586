"""The engine thread: drives ``engine.step()`` and bridges request outputs to asyncio handlers.

HTTP handlers never run engine code that mutates its state while a step is in flight: requests go in
through the engine's thread-safe ``add_request``/``abort``, and other calls that must not overlap a step
run as a job on the engine thread between two steps.

The thread also publishes what scrapes and probes read, so that neither waits for it: a snapshot of
``engine.stats()`` and ``engine.list_adapters()`` (at most every ``snapshot_interval_s``), and a heartbeat,
the time it last finished a step or found nothing to do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, Callable, Optional, Sequence

from slora_jax.types import RequestOutput, SamplingParams

log = logging.getLogger("slora_jax.server")


class EngineFailed(RuntimeError):
    """The engine thread stopped on an unexpected exception; the server can no longer generate."""


class RequestHandle:
    """One engine request seen from the event loop: its outputs arrive on ``outputs`` in order."""

    def __init__(self, loop: "EngineLoop", request_id: str, aio_loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.outputs: "asyncio.Queue[RequestOutput | BaseException]" = asyncio.Queue()
        self.finished = False
        self._loop = loop
        self._aio = aio_loop

    def _push(self, item) -> None:
        """Called on the engine thread."""
        try:
            self._aio.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    async def next(self) -> RequestOutput:
        """The next cumulative output; raises EngineFailed if the engine thread died."""
        item = await self.outputs.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Stop the request (idempotent; its pages are freed at the engine's next step)."""
        if not self.finished:
            self.finished = True
            self._loop.abort(self.request_id)


class EngineLoop:
    """Owns the thread that calls ``engine.step()``; safe to call from any thread or the event loop."""

    def __init__(self, engine, idle_wait_s: float = 0.05, snapshot_interval_s: float = 1.0,
                 on_snapshot: Optional[Callable[[dict, list], None]] = None):
        self.engine = engine
        self._idle_wait_s = idle_wait_s
        self._snapshot_interval_s = snapshot_interval_s
        self._on_snapshot = on_snapshot
        self._last_snapshot = float("-inf")
        self.heartbeat = time.monotonic()  # the last time the thread finished a step or an idle wait
        self._wake = threading.Event()
        self._jobs: "queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]]" = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._handles: dict[str, RequestHandle] = {}
        self._handles_lock = threading.Lock()
        self.failure: Optional[BaseException] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="slora-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    def _run(self) -> None:
        try:
            busy = False
            while not self._stop.is_set():
                self._run_jobs()
                if self.engine.has_unfinished():
                    self.engine.step()
                    busy = True
                    self._publish()
                else:
                    self._publish(force=busy)  # the state after the last step, before a pause
                    busy = False
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
                self.heartbeat = time.monotonic()
        except BaseException as e:  # anything here leaves the engine in an unknown state
            log.exception("engine thread stopped")
            self.failure = e
            self._fail_all(EngineFailed(f"the engine stopped: {type(e).__name__}: {e}"))
        finally:
            self._fail_jobs()

    def _publish(self, force: bool = False) -> None:
        """Hand the engine's stats to ``on_snapshot``, rate-limited so that scrapes never cost steps."""
        if self._on_snapshot is None:
            return
        now = time.monotonic()
        if not force and now - self._last_snapshot < self._snapshot_interval_s:
            return
        self._last_snapshot = now
        try:
            self._on_snapshot(self.engine.stats(), self.engine.list_adapters())
        except Exception:  # metrics must never stop generation
            log.exception("engine snapshot failed")

    def refresh_snapshot(self) -> None:
        """Publish a snapshot at the next iteration (after an adapter load or unload, say)."""
        self._last_snapshot = float("-inf")
        self._wake.set()

    def stalled_for(self) -> float:
        """Seconds since the engine thread last made progress (finished a step or an idle wait)."""
        return time.monotonic() - self.heartbeat

    def _run_jobs(self) -> None:
        while True:
            try:
                fn, fut = self._jobs.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # the job's caller gets the exception; the engine keeps serving
                fut.set_exception(e)

    def _fail_jobs(self) -> None:
        while True:
            try:
                _, fut = self._jobs.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineFailed("the engine is not running"))

    def _fail_all(self, exc: BaseException) -> None:
        with self._handles_lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for h in handles:
            h._push(exc)

    # ------------------------------------------------------------------ calls
    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the engine thread between two steps and return its result (or raise)."""
        if not self.alive:
            raise EngineFailed("the engine is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        self._wake.set()
        if not self.alive:  # died between the check and the put: nobody will run the job
            self._fail_jobs()
        return await asyncio.wrap_future(fut)

    def submit(self, prompt: Sequence[int], adapter: Optional[str], sampling: SamplingParams) -> RequestHandle:
        """Queue one request (validated now: raises RequestError & co.); outputs arrive on the handle."""
        if not self.alive:
            raise EngineFailed("the engine is not running")
        handle = RequestHandle(self, "", asyncio.get_running_loop())
        engine_done = threading.Event()

        def listener(out: RequestOutput) -> None:
            if out.finished:
                with self._handles_lock:
                    engine_done.set()
                    self._handles.pop(out.request_id, None)
            handle._push(out)

        rid = self.engine.add_request(list(prompt), adapter=adapter, sampling=sampling, listener=listener)
        handle.request_id = rid
        with self._handles_lock:
            # Tracked so that an engine failure reaches it; a request already finished needs no tracking.
            if not engine_done.is_set():
                self._handles[rid] = handle
        self._wake.set()
        return handle

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()
