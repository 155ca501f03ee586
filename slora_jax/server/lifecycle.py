"""The server's life: starting (model loading and compiling, probes answer 503), ready, draining (after
SIGTERM), and the requests in flight through all of it.

Probes, as Kubernetes uses them:
- ``/live``: the process makes progress: 200 while starting and while the engine thread finishes steps;
  503 once the engine thread died or has not come back from one step for ``stall_timeout_s``.
- ``/ready`` and ``/health``: 200 only when requests can be served now; 503 with ``status`` ``starting``,
  ``draining``, ``stalled`` or ``stopped`` otherwise.

Every generation a handler starts is tracked here, so that a request deadline and the end of a shutdown
drain can end it with an OpenAI error (a JSON body, or an error event then ``[DONE]`` on a stream) rather
than have the connection cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from typing import Optional

from slora_jax.server.errors import APIError, error_body, unavailable

log = logging.getLogger("slora_jax.server")

PROBE_PATHS = ("/health", "/live", "/ready")
# A step that compiles can hold the engine thread for minutes on a large model (see `serve --precompile`).
DEFAULT_STALL_TIMEOUT_S = 300.0


class Lifecycle:
    """Phase, engine liveness and the generations in flight. Used on the event loop only (the shutdown
    signal handler hops onto it)."""

    def __init__(self, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S, request_timeout_s: Optional[float] = None):
        self.phase = "starting"  # starting | ready | draining | failed
        self.detail = "loading the model"  # what starting is doing now, for the probes
        self.stall_timeout_s = stall_timeout_s
        self.request_timeout_s = request_timeout_s
        self.engine_loop = None  # EngineLoop, once there is one
        self.active: dict = {}  # Generation -> its deadline timer (or None)
        self.aio: Optional[asyncio.AbstractEventLoop] = None

    # ------------------------------------------------------------------ probes
    def live(self) -> tuple[int, dict]:
        if self.phase == "starting":
            return 200, {"status": "starting", "detail": self.detail}
        if self.phase == "failed":
            return 503, {"status": "stopped", "detail": self.detail}
        return self._engine_state() or (200, {"status": "ok"})

    def ready(self) -> tuple[int, dict]:
        if self.phase == "starting":
            return 503, {"status": "starting", "detail": self.detail}
        if self.phase == "failed":
            return 503, {"status": "stopped", "detail": self.detail}
        if self.phase == "draining":
            return 503, {"status": "draining", "detail": "the server is shutting down"}
        return self._engine_state() or (200, {"status": "ok"})

    def _engine_state(self) -> Optional[tuple[int, dict]]:
        loop = self.engine_loop
        if loop is None or not loop.alive:
            return 503, {"status": "stopped", "detail": "the engine thread is not running"}
        stalled = loop.stalled_for()
        if stalled > self.stall_timeout_s:
            return 503, {"status": "stalled", "detail": f"the engine has made no progress for {stalled:.0f} s "
                         f"(--stall-timeout {self.stall_timeout_s:g})"}
        return None

    # ------------------------------------------------------------------ requests
    def refuse_if_not_serving(self) -> None:
        if self.phase == "draining":
            raise unavailable("the server is shutting down; retry on another replica", "shutting_down",
                              retry_after=1)
        if self.phase != "ready":
            raise unavailable(f"the server is starting ({self.detail})", "starting", retry_after=5)

    def track(self, gen) -> None:
        """Follow ``gen`` until it closes; end it with an error when the request deadline passes."""
        timer = None
        if self.request_timeout_s:
            error = APIError(504, f"the request ran past this server's deadline of {self.request_timeout_s:g} s "
                             "(--request-timeout)", "timeout_error", "request_timeout")
            timer = asyncio.get_running_loop().call_later(self.request_timeout_s, gen.fail, error)
        self.active[gen] = timer

    def untrack(self, gen) -> None:
        timer = self.active.pop(gen, None)
        if timer is not None:
            timer.cancel()

    def begin_drain(self, deadline_s: float) -> None:
        """Stop taking requests; after ``deadline_s`` end those still running with an error."""
        if self.phase == "draining":
            return
        self.phase = "draining"
        n = len(self.active)
        log.info("shutting down: %d request(s) in flight get %g s to finish", n, deadline_s)
        asyncio.get_running_loop().call_later(deadline_s, self.end_all, deadline_s)

    def end_all(self, deadline_s: float) -> None:
        if self.active:
            log.warning("ending %d request(s) still running after the %g s drain", len(self.active), deadline_s)
        error = unavailable(f"the server shut down before this request finished (drain of {deadline_s:g} s)",
                            "shutting_down", retry_after=1)
        for gen in list(self.active):
            gen.fail(error)


async def _send_json(send, status: int, obj: dict, headers=()) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def probe_answer(lifecycle: Lifecycle, path: str) -> tuple[int, dict]:
    return lifecycle.live() if path == "/live" else lifecycle.ready()


class StartingGate:
    """ASGI app that serves while the engine is still being built: probes answer from ``lifecycle``, every
    other route 503 ``starting``. ``install(app)`` hands over to the real app (entering its lifespan);
    lifespan shutdown leaves it again. ``on_startup(loop)`` runs once the server's event loop is up."""

    def __init__(self, lifecycle: Lifecycle, on_startup=None):
        self.lifecycle = lifecycle
        self.app = None
        self._on_startup = on_startup
        self._stack = contextlib.AsyncExitStack()

    async def install(self, app) -> None:
        await self._stack.enter_async_context(app.router.lifespan_context(app))
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        if path in PROBE_PATHS:
            status, obj = probe_answer(self.lifecycle, path)
            return await _send_json(send, status, obj)
        phase = self.lifecycle.phase
        message = (f"the server is starting ({self.lifecycle.detail})" if phase == "starting"
                   else f"the server could not start: {self.lifecycle.detail}")
        await _send_json(send, 503, error_body(message, "service_unavailable", "starting"),
                         [(b"retry-after", b"5")])

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.lifecycle.aio = asyncio.get_running_loop()
                if self._on_startup is not None:
                    self._on_startup(self.lifecycle.aio)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self._stack.aclose()  # the real app's shutdown: stops the engine thread
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return


def draining_server(config, lifecycle: Lifecycle, drain_s: float):
    """An uvicorn.Server whose first SIGTERM/SIGINT starts a drain: listeners close at once (uvicorn), the
    requests in flight get ``drain_s`` seconds, then those left are ended with an OpenAI error. uvicorn's
    own grace period (config.timeout_graceful_shutdown) must exceed ``drain_s`` so those errors are sent."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            aio = lifecycle.aio
            if aio is not None and not self.should_exit:
                aio.call_soon_threadsafe(lifecycle.begin_drain, drain_s)
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def say(message: str) -> None:
    """A start-up line for whoever watches the terminal (logging may not be configured to show INFO)."""
    print(f"slora-jax: {message}", flush=True)


class Progress:
    """What starting is doing, told both to the terminal and to the probes."""

    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle

    def step(self, detail: str, where: str = "") -> None:
        """``detail`` goes to the probes too (which anyone may read); ``where`` (a path) only to the terminal."""
        self.lifecycle.detail = detail
        say(f"{detail} {where}" if where else detail)

    def compiling(self, total: int):
        """``on_compiled`` for Engine.precompile: a line at each tenth of ``total`` programs."""
        done = [0]
        marks = {max(1, round(total * k / 10)) for k in range(1, 11)}

        def on_compiled(record) -> None:
            done[0] += 1
            self.lifecycle.detail = f"compiling step programs: {done[0]}/{total}"
            if done[0] in marks:
                say(self.lifecycle.detail)
        return on_compiled


def serve(build, sock, lifecycle: Lifecycle, *, drain_s: float, header_timeout_s: Optional[float],
          max_connections: Optional[int], keep_alive_s: float, log_level: str = "info") -> int:
    """Serve on ``sock`` at once, while ``build()`` (run on a thread of its own) loads the engine and returns
    the app; until then probes answer 503 ``starting`` and other routes 503. Returns the exit code: 0 after
    a signal, 1 when ``build`` failed (its error printed as one line)."""
    import threading

    import uvicorn

    failed: list[BaseException] = []
    server = None

    def load(aio) -> None:
        try:
            app = build()
            asyncio.run_coroutine_threadsafe(gate.install(app), aio).result()
        except BaseException as e:  # reported, and the server stops: there is nothing to serve
            failed.append(e)
            # The probes, which need no key, say only that it failed: the message may name server paths.
            lifecycle.phase, lifecycle.detail = "failed", "start-up failed (the server's log says why)"
            say(f"error: cannot start: {type(e).__name__}: {e}")
            log.debug("start-up failed", exc_info=True)
            aio.call_soon_threadsafe(setattr, server, "should_exit", True)
            return
        if lifecycle.phase == "ready":
            say("ready")

    loader: list[threading.Thread] = []

    def start_loading(aio) -> None:
        loader.append(threading.Thread(target=load, args=(aio,), name="slora-startup", daemon=True))
        loader[0].start()

    gate = StartingGate(lifecycle, on_startup=start_loading)
    from slora_jax.server.connections import guarded_protocol

    config = uvicorn.Config(gate, log_level=log_level, http=guarded_protocol(header_timeout_s, max_connections),
                            timeout_keep_alive=keep_alive_s, timeout_graceful_shutdown=drain_s + 5)
    server = draining_server(config, lifecycle, drain_s)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    code = 1 if failed else 0
    if loader and loader[0].is_alive():
        # Stopped while still loading or compiling: the compiler's worker threads would hold the exit
        # until they finish, minutes on a large model. Nothing is being served, so nothing is lost.
        say("stopped while starting")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
