"""Plain-JAX K/V write: one scatter per tensor into the pool viewed as rows [L, P*R, W].

The "xla" backend. When the caller's jit donates the pool (donate_argnums), XLA performs the
scatter in place: cost O(T * W), independent of the pool's size. Without donation the pool is
copied first. Rows < 0 (and >= P*R) are skipped; two tokens naming one row leave either value.
A pool stored as bfloat16 bits (uint16, `pool_storage`) gets an integer scatter of the rows' bits: a bf16
scatter would be widened by XLA:CPU into a float32 round trip of the whole pool.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import pool_storage


def write_kv_reference(pool, layer, k, v, k_rows, v_rows):
    """Shapes as `write_kv`."""
    L, P, R, W = pool.shape
    n = P * R
    layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(()), 0, L - 1)
    rows = pool.reshape(L, n, W)
    for x, r in ((k, k_rows), (v, v_rows)):
        r = jnp.where((r >= 0) & (r < n), r, n)  # n is out of bounds: dropped
        rows = rows.at[layer, r].set(pool_storage.to_storage(x, pool), mode="drop")
    return rows.reshape(pool.shape)
