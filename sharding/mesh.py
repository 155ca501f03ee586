"""The device mesh: one "model" axis (tensor parallelism) over the devices of every process in the job."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MODEL_AXIS = "model"


def make_mesh(tensor_parallel: int, devices: Optional[Sequence] = None) -> Mesh:
    """A 1-D mesh of the first ``tensor_parallel`` devices along ``MODEL_AXIS``."""
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be a positive integer, got {tensor_parallel!r}")
    if tensor_parallel > len(devices):
        raise ValueError(f"tensor_parallel={tensor_parallel} but only {len(devices)} device(s) are visible")
    return Mesh(np.array(devices[:tensor_parallel]), (MODEL_AXIS,))
