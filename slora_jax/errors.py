"""Exceptions a user can act on. Every failure the engine reports is one of these."""

from __future__ import annotations


class SloraError(Exception):
    """Base class of every error raised by slora_jax on purpose."""


class ModelError(SloraError, ValueError):
    """Unsupported, inconsistent or corrupt base checkpoint."""


class AdapterError(SloraError, ValueError):
    """Bad, corrupt, too large or mismatched adapter, or an adapter name that is not usable."""


class UnknownAdapterError(AdapterError, LookupError):
    """A request or call names an adapter that is not registered."""


class RequestError(SloraError, ValueError):
    """A request the engine cannot serve as given: prompt too long, bad sampling values, bad tokens."""


class CapacityError(SloraError, RuntimeError):
    """The engine cannot take more work right now (queue full); retry later."""


class ConfigError(SloraError, ValueError):
    """An EngineConfig value that cannot work on this model or machine."""


class ProcessMismatchError(SloraError, RuntimeError):
    """The processes of a multi-process engine made different calls or submitted different requests."""
