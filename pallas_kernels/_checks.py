"""Shape/dtype checks at the public edge of every op, and small static helpers shared by kernels."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import pool_storage
from pallas_kernels._errors import KernelInputError


def check_array(op: str, name: str, a, *, ndim: int, kind: str, shape: Sequence | None = None):
    """Check rank, dtype kind ("float" | "int") and optionally the exact shape (None = any size)."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise KernelInputError(f"{op}: {name} must be an array, got {type(a).__name__}")
    if a.ndim != ndim:
        raise KernelInputError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if kind == "float" and not jnp.issubdtype(a.dtype, jnp.floating):
        raise KernelInputError(f"{op}: {name} must be a float array, got dtype {a.dtype}")
    if kind == "int" and not jnp.issubdtype(a.dtype, jnp.integer):
        raise KernelInputError(f"{op}: {name} must be an integer array, got dtype {a.dtype}")
    if shape is not None:
        want = tuple(shape)
        got = tuple(a.shape)
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            shown = tuple("*" if w is None else w for w in want)
            raise KernelInputError(f"{op}: {name} must have shape {shown}, got {got}")


def check_pool(op: str, pool) -> jnp.dtype:
    """A 4-d page pool of float elements, stored as floats or as bfloat16 bits (uint16, its CPU storage).
    Returns the elements' dtype, the one the op's float inputs must have."""
    if hasattr(pool, "dtype") and pool_storage.is_bits(pool):
        check_array(op, "pool", pool, ndim=4, kind="int")
    else:
        check_array(op, "pool", pool, ndim=4, kind="float")
    return pool_storage.element_dtype(pool)


def check_scalar_int(op: str, name: str, a):
    """A Python int or a 0-d / shape-[1] integer array (possibly traced)."""
    if isinstance(a, (int, np.integer)):
        return
    if not hasattr(a, "dtype") or not jnp.issubdtype(a.dtype, jnp.integer) or a.size != 1 or a.ndim > 1:
        raise KernelInputError(f"{op}: {name} must be an integer scalar, got {getattr(a, 'shape', a)!r}")


def check_layer(op: str, layer, num_layers: int):
    """An integer scalar; when static, inside [0, num_layers). Traced values are clipped by the ops."""
    check_scalar_int(op, "layer", layer)
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < num_layers:
        raise KernelInputError(f"{op}: layer {layer} is outside the pool's {num_layers} layers")


def as_index_vector(a) -> jax.Array:
    """An integer scalar as an int32 array of shape [1], the form kernels read with a scalar load."""
    return jnp.asarray(a, jnp.int32).reshape(1)


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap."""
    d = 1
    while n % (d * 2) == 0 and d * 2 <= cap:
        d *= 2
    return d


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def matmul_precision(dtype):
    """float32 products at full precision (IEEE on the GPU, not TF32); narrower types as they are."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def check_paged_query(op: str, q, pool, layer, sm_scale, sliding_window) -> tuple:
    """Checks shared by the attention ops that read K/V from the pool: q [N, Nq, D] and pool [L, P, R, W] of one
    float dtype (the pool's elements', see `check_pool`), W = Nkv * D with Nq a multiple of Nkv, the layer, the
    softmax scale and the window. Returns (N, Nq, D, Nkv, L, P, R)."""
    check_array(op, "q", q, ndim=3, kind="float")
    N, Nq, D = q.shape
    pool_dtype = check_pool(op, pool)
    L, P, R, W = pool.shape
    if W % D:
        raise KernelInputError(f"{op}: pool width W = {W} must be num_kv_heads * head_dim, not a multiple of D = {D}")
    Nkv = W // D
    if Nq % Nkv:
        raise KernelInputError(f"{op}: {Nq} query heads are not a multiple of the pool's {Nkv} KV heads (W // D)")
    check_layer(op, layer, L)
    if not isinstance(sm_scale, (int, float)) or not sm_scale > 0:
        raise KernelInputError(f"{op}: sm_scale must be a positive Python float, got {sm_scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise KernelInputError(f"{op}: sliding_window must be None or a positive int, got {sliding_window!r}")
    if q.dtype != pool_dtype:
        raise KernelInputError(f"{op}: q dtype {q.dtype} must match the pool dtype {pool_dtype}")
    return N, Nq, D, Nkv, L, P, R
