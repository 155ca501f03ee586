"""Plain-JAX paged prefill attention: gather each token's request pages, then a dense masked softmax.

The "xla" backend. Moves every token's full page table (NB * R keys) through a gather, so it costs
T x capacity: fine for the CPU and for tests, not for long prompts on a GPU.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import pool_storage
from pallas_kernels._checks import matmul_precision
from pallas_kernels.ops.paged_prefill_attention.layout import PagedPrefillDims


def paged_prefill_attention_reference(q, pool, layer, token_row, positions, k_pages, v_pages, *, dims: PagedPrefillDims):
    """Shapes as `paged_prefill_attention`."""
    T, Nkv, G, D = dims.num_tokens, dims.num_kv_heads, dims.group, dims.head_dim
    layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(()), 0, dims.num_layers - 1)
    valid = (token_row >= 0) & (token_row < dims.num_rows)
    row = jnp.clip(token_row, 0, dims.num_rows - 1)

    def gather(pages):  # [T, capacity, Nkv, D]: each token's request's keys (or values)
        table = jnp.clip(pages[row], 0, dims.num_pages - 1)
        return pool_storage.to_elements(pool[layer, table]).reshape(T, dims.capacity, Nkv, D)

    kpos = jnp.arange(dims.capacity)[None, :]
    pos = positions[:, None]
    ok = valid[:, None] & (kpos <= pos)
    if dims.sliding_window is not None:
        ok &= kpos > pos - dims.sliding_window
    prec = matmul_precision(q.dtype)
    qg = q.reshape(T, Nkv, G, D)
    s = jnp.einsum("thgd,tkhd->thgk", qg, gather(k_pages), precision=prec, preferred_element_type=jnp.float32)
    s = s * dims.sm_scale
    okb = ok[:, None, None, :]
    m = jnp.max(jnp.where(okb, s, -jnp.inf), axis=-1, keepdims=True)
    p = jnp.where(okb, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    # Rows past a request's keys may hold anything (even NaN): zero them, not just their weights.
    v = jnp.where(ok[:, :, None, None], gather(v_pages), 0)
    o = jnp.einsum("thgk,tkhd->thgd", p.astype(v.dtype), v, precision=prec, preferred_element_type=jnp.float32)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    return o.reshape(T, dims.num_q_heads, D).astype(q.dtype)
