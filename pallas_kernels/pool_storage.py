"""How a page pool's elements are stored, and the two conversions every op that touches the pool makes.

On a CPU, XLA has no bfloat16 scatter or dynamic-update-slice: its `float-normalization-bf16` pass widens
the written operand, which is the whole pool, to float32 and back on every write (three full passes per
layer per step, benchmarks/NOTES.md). A bfloat16 pool on a CPU is therefore stored as uint16 holding the
same bits: a write scatters integers, in place and independent of the pool's size, and a reader bitcasts
only the rows it gathered, which XLA fuses into the gather. A bitcast of the whole pool would not do: the
CPU backend materialises it as a copy.

Everywhere else (GPU, where the Pallas kernels read the pool directly) a pool keeps its float dtype.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

BITS = jnp.dtype(jnp.uint16)  # storage of a bfloat16 pool on a CPU
_BITS_OF = jnp.dtype(jnp.bfloat16)


def storage_dtype(dtype, backend: Optional[str] = None) -> jnp.dtype:
    """The dtype a pool of `dtype` elements is allocated in on `backend` (default: JAX's default backend)."""
    dtype = jnp.dtype(dtype)
    backend = jax.default_backend() if backend is None else backend
    return BITS if dtype == _BITS_OF and backend == "cpu" else dtype


def element_dtype(pool_or_dtype) -> jnp.dtype:
    """The float dtype of a pool's elements (what its rows mean), from the pool or its storage dtype."""
    dtype = jnp.dtype(getattr(pool_or_dtype, "dtype", pool_or_dtype))
    return _BITS_OF if dtype == BITS else dtype


def is_bits(pool) -> bool:
    """True when the pool holds its elements' bits as integers (a bfloat16 pool on a CPU)."""
    return jnp.dtype(pool.dtype) == BITS


def to_elements(rows):
    """Rows gathered from a pool, as its float elements (a bitcast of those rows only, when stored as bits)."""
    if jnp.dtype(rows.dtype) == BITS:
        return jax.lax.bitcast_convert_type(rows, _BITS_OF)
    return rows


def to_storage(x, pool):
    """Rows about to be written into `pool`, cast to its elements' dtype and put in its storage dtype."""
    x = x.astype(element_dtype(pool))
    if is_bits(pool):
        return jax.lax.bitcast_convert_type(x, BITS)
    return x


def pallas_unsupported(pool) -> Optional[str]:
    """Why the Pallas kernels cannot take this pool (None if they can): they read float elements."""
    if is_bits(pool):
        return ("the pool stores bfloat16 as uint16 bits (its CPU storage, see pallas_kernels.pool_storage); "
                "use the XLA path")
    return None
