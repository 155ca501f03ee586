"""One HTTP exchange with an ASGI app in this process, without a socket: how a Ray replica serves the request
the ingress forwarded to it through the very routes, schemas and errors of ``slora-jax serve``.

    async for part in call_app(app, HttpCall("POST", "/v1/completions", body=b"{...}")):
        ...  # first a ResponseStart, then body chunks (bytes) as the app sends them
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

# Hop-by-hop and length headers describe one connection; the connection that carries the answer onwards
# sets its own.
_CONNECTION_HEADERS = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}


@dataclass
class HttpCall:
    """A request as the ingress received it. ``headers``: raw (name, value) byte pairs, names lower case."""

    method: str
    path: str
    query: bytes = b""
    headers: list = field(default_factory=list)
    body: bytes = b""


@dataclass
class ResponseStart:
    status: int
    headers: list  # [(name, value)] as bytes, connection headers left out
    body: Optional[bytes] = None  # the whole body, when it travels with the start rather than after it

    def header(self, name: bytes) -> bytes:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return b""

    @property
    def is_stream(self) -> bool:
        return self.header(b"content-type").startswith(b"text/event-stream")


async def call_app(app, call: HttpCall) -> AsyncIterator[Union[ResponseStart, bytes]]:
    """Run ``call`` through ``app``: yields one ResponseStart, then the body's chunks. Closing the iterator
    early is the client going away: the app sees ``http.disconnect`` and its handler is cancelled."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": call.method, "scheme": "http", "path": call.path, "raw_path": call.path.encode(),
             "root_path": "", "query_string": call.query, "headers": [(bytes(k).lower(), bytes(v))
                                                                      for k, v in call.headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80), "state": {}}
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await out.put(message)

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.ensure_future(run())
    try:
        while True:
            message = await out.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [(k, v) for k, v in message.get("headers", [])
                                                        if k.lower() not in _CONNECTION_HEADERS])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        await task  # the app's own exceptions surface here
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 5.0)  # the handler's cleanup after the disconnect
            task.cancel()


class Lifespan:
    """Runs an ASGI app's lifespan (startup, then shutdown on ``stop``) in this event loop."""

    def __init__(self, app):
        self.app = app
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._failure = None
        self._task = None

    async def start(self) -> None:
        async def receive():
            return await self._inbox.get()

        async def send(message):
            kind = message["type"]
            if kind.endswith(".failed"):
                self._failure = message.get("message", kind)
            if kind.startswith("lifespan.startup"):
                self._started.set()
            elif kind.startswith("lifespan.shutdown"):
                self._stopped.set()

        self._task = asyncio.ensure_future(self.app({"type": "lifespan", "asgi": {"version": "3.0"},
                                                     "state": {}}, receive, send))
        await self._inbox.put({"type": "lifespan.startup"})
        await self._started.wait()
        if self._failure:
            raise RuntimeError(f"the app did not start: {self._failure}")

    async def stop(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), 30.0)
