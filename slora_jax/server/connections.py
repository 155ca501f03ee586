"""Connection-level limits that uvicorn does not have: a bound on the time a client may take to send a
request's headers, and a cap on open connections.

uvicorn times out only idle keep-alive connections; a client that opens a connection and sends half a
request line, or nothing, holds it (and its file descriptor) for as long as it likes. Its
``limit_concurrency`` still accepts every connection and answers in plain text. Here, a connection whose
request headers are not complete ``header_timeout_s`` after it opened (or after its previous response) is
answered 408 and closed, and one beyond ``max_connections`` is answered 503 and closed at once, both with
the OpenAI error body. Bodies have their own bound (RequestGuard's ``body_timeout_s``).
"""

from __future__ import annotations

import json
from typing import Optional

from slora_jax.server.errors import error_body


def _raw_response(status: int, reason: str, message: str, type: str, code: str, extra: str = "") -> bytes:
    body = json.dumps(error_body(message, type, code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n")
    return head.encode() + body


def guarded_protocol(header_timeout_s: Optional[float], max_connections: Optional[int]):
    """An uvicorn HTTP/1.1 protocol class (``uvicorn.Config(http=...)``) that enforces both limits."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeout_answer = _raw_response(408, "Request Timeout", f"the request's headers did not arrive within "
                                   f"{header_timeout_s:g} s", "invalid_request_error", "request_timeout") \
        if header_timeout_s else b""
    full_answer = _raw_response(503, "Service Unavailable", f"the server already has {max_connections} open "
                                "connections; retry later", "service_unavailable", "too_many_connections",
                                "retry-after: 1\r\n") if max_connections else b""

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if max_connections and len(self.connections) > max_connections:
                transport.write(full_answer)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._between_requests() and self._header_timer is None:
                self._arm()  # the first bytes of a next request on a kept-alive connection
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers were complete: its handler runs now
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if header_timeout_s:
                self._disarm()
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._between_requests():
                return
            self._unset_keepalive_if_required()
            self.transport.write(timeout_answer)
            self.transport.close()

    return GuardedH11Protocol
