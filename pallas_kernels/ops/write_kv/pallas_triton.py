"""Pallas (Triton lowering) K/V write: one program per token copies its K and V rows into the pool.

The pool is aliased input->output, so under a donating jit nothing but the T * W * 2 written
elements moves. Bound: bytes (read k, v; write the same into scattered rows); one program per
token copies 2 * W elements in blocks of BW columns. Same semantics as the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels._checks import as_index_vector, pow2_divisor


def _kernel(layer_ref, k_rows_ref, v_rows_ref, k_ref, v_ref, pool_ref, o_ref, *, n_rows, width, bw):
    del pool_ref  # aliased with o_ref
    t = pl.program_id(0)
    layer = layer_ref[0]
    for rows_ref, x_ref in ((k_rows_ref, k_ref), (v_rows_ref, v_ref)):
        row = rows_ref[t]

        @pl.when((row >= 0) & (row < n_rows))
        def _():
            for c0 in range(0, width, bw):
                o_ref[layer, row, pl.ds(c0, bw)] = x_ref[t, pl.ds(c0, bw)].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps"))
def write_kv_pallas(pool, layer, k, v, k_rows, v_rows, *, interpret: bool, num_warps: int = 4):
    """Shapes as `write_kv`."""
    L, P, R, W = pool.shape
    rows = pool.reshape(L, P * R, W)
    out = _backend.update_in_place(
        functools.partial(_kernel, n_rows=P * R, width=W, bw=pow2_divisor(W, 1024)),
        jnp.clip(as_index_vector(layer), 0, L - 1), k_rows.astype(jnp.int32), v_rows.astype(jnp.int32), k, v, rows,
        grid=(k.shape[0],), num_warps=num_warps, num_stages=1, interpret=interpret, name="write_kv",
    )
    return out.reshape(pool.shape)
