"""Public entry of the K/V write."""

from __future__ import annotations

from typing import Optional

import jax

from pallas_kernels import _backend, pool_storage
from pallas_kernels._checks import check_array, check_layer, check_pool
from pallas_kernels.ops.write_kv import pallas_triton
from pallas_kernels.ops.write_kv.reference import write_kv_reference

_reference_jit = jax.jit(write_kv_reference)


def write_kv(
    pool: jax.Array,
    layer,
    k: jax.Array,
    v: jax.Array,
    k_rows: jax.Array,
    v_rows: jax.Array,
    implementation: Optional[str] = None,
) -> jax.Array:
    """Write new tokens' K and V rows of one layer into the page pool.

    Args:
      pool: [L, P, R, W] page pool (float, or bfloat16 stored as uint16 bits: `pool_storage`).
      layer: int32 scalar (may be traced).
      k, v: [T, W] rows to write (cast to the pool's element dtype).
      k_rows, v_rows: [T] int32 flat row index page * R + i of each token's K / V; negative = skip.
      implementation: None (Pallas on GPU, XLA elsewhere), "xla" or "pallas".

    Returns:
      The updated pool [L, P, R, W]. In place (no copy of the pool) when the caller's jit donates
      `pool`, e.g. `jax.jit(step, donate_argnums=...)`; otherwise XLA copies it first.
    """
    op = "write_kv"
    check_pool(op, pool)
    L, P, R, W = pool.shape
    check_array(op, "k", k, ndim=2, kind="float", shape=(None, W))
    T = k.shape[0]
    check_array(op, "v", v, ndim=2, kind="float", shape=(T, W))
    check_array(op, "k_rows", k_rows, ndim=1, kind="int", shape=(T,))
    check_array(op, "v_rows", v_rows, ndim=1, kind="int", shape=(T,))
    check_layer(op, layer, L)
    impl = _backend.resolve(implementation, op, pool_storage.pallas_unsupported(pool))
    if T == 0:
        return pool
    if impl == "xla":
        return _reference_jit(pool, layer, k, v, k_rows, v_rows)
    return pallas_triton.write_kv_pallas(pool, layer, k, v, k_rows, v_rows, interpret=_backend.interpret_mode())
