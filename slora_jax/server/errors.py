"""HTTP errors in the OpenAI error format, and the mapping from engine exceptions to status codes."""

from __future__ import annotations

from typing import Optional

from slora_jax.errors import (AdapterError, CapacityError, ConfigError, ModelError, RequestError,
                              UnknownAdapterError)


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = code if code is not None else str(status)
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str, param: Optional[str] = None) -> dict:
    """The OpenAI error object (also sent as a server-sent event when a stream fails mid-way)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", "bad_request", param)


def model_not_found(message: str) -> APIError:
    return APIError(404, message, "not_found_error", "model_not_found", "model")


# Seconds a client told "over capacity" waits before retrying: a few decode steps' worth of requests finish
# in that time, and clients that honour it do not retry in a tight loop.
RETRY_AFTER_S = 1


def over_capacity(message: str) -> APIError:
    """429, with the Retry-After header every 429 carries."""
    return APIError(429, message, "rate_limit_error", "over_capacity", headers={"Retry-After": str(RETRY_AFTER_S)})


def unavailable(message: str, code: str = "engine_unavailable", retry_after: Optional[int] = None) -> APIError:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return APIError(503, message, "service_unavailable", code, headers=headers)


def from_engine_error(exc: Exception) -> APIError:
    """The HTTP answer to an exception raised by an engine call: the client's fault is 4xx, the rest 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownAdapterError):
        return model_not_found(str(exc))
    if isinstance(exc, CapacityError):
        return over_capacity(str(exc))
    if isinstance(exc, (RequestError, AdapterError, ConfigError)):
        return bad_request(str(exc))
    if isinstance(exc, ModelError):
        return bad_request(str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")
