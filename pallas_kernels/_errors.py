"""The exception every kernel raises for inputs it cannot take (shapes, dtypes, static options)."""

from __future__ import annotations


class KernelInputError(ValueError):
    """Inputs to a kernel have the wrong shape, dtype or static option; the message names which."""
