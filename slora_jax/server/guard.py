"""ASGI middleware in front of every route: API-key check, request body size bound and body read timeout.

Sits outside FastAPI so that a refused request costs no parsing; answers in the OpenAI error format.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Optional

from slora_jax.server.errors import error_body

# Paths anyone may read: liveness probes and Prometheus scrapers carry no API key.
OPEN_PATHS = ("/health", "/live", "/ready", "/metrics")


async def _send_error(send, status: int, message: str, type: str, code: str, extra_headers=()) -> None:
    body = json.dumps(error_body(message, type, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Refuse requests without ``Authorization: Bearer <api_key>`` (401), bodies over ``max_body_bytes``
    (413) and bodies not received within ``body_timeout_s`` of their headers (408); count refusals in
    ``on_error(status)``."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, on_error=None,
                 body_timeout_s: Optional[float] = None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.on_error = on_error or (lambda status: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(scope):
            self.on_error(401)
            return await _send_error(send, 401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                     "authentication_error", "invalid_api_key",
                                     [(b"www-authenticate", b"Bearer")])
        length = self._content_length(scope)
        if length is not None and length > self.max_body_bytes:
            self.on_error(413)
            return await self._too_large(send)
        # Read the whole body first (bounded), then replay it: a chunked upload cannot exceed the bound either.
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = None if not self.body_timeout_s else loop.time() + self.body_timeout_s
        while True:
            try:
                message = await (receive() if deadline is None
                                 else asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0)))
            except asyncio.TimeoutError:  # a client that stopped half-way must not hold the connection
                self.on_error(408)
                return await _send_error(send, 408, f"the request body did not arrive within "
                                         f"{self.body_timeout_s:g} s", "invalid_request_error", "request_timeout",
                                         [(b"connection", b"close")])
            if message["type"] != "http.request":  # client gone before the body arrived
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                self.on_error(413)
                return await self._too_large(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards only http.disconnect can come

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    @staticmethod
    def _content_length(scope) -> Optional[int]:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    async def _too_large(self, send) -> None:
        await _send_error(send, 413, f"request body larger than {self.max_body_bytes} bytes",
                          "invalid_request_error", "request_too_large")
