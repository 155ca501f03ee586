"""Plain-JAX paged decode attention: gather each request's K/V pages, then dense masked softmax.

The "xla" backend. Moves every request's full page table (NB * R tokens) through a gather, so it
costs the table's capacity, not the live lengths.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import pool_storage
from pallas_kernels._checks import matmul_precision
from pallas_kernels.ops.paged_decode_attention.layout import PagedAttentionDims


def key_mask(lengths, dims: PagedAttentionDims):
    """[B, NB*R] bool: key position j is attended by the query at position lengths-1."""
    pos = jnp.arange(dims.capacity)[None, :]
    length = jnp.clip(lengths, 0, dims.capacity)[:, None]
    ok = pos < length
    if dims.sliding_window is not None:
        ok &= pos > length - 1 - dims.sliding_window
    return ok


def paged_decode_attention_reference(q, pool, layer, k_pages, v_pages, lengths, *, dims: PagedAttentionDims):
    """Shapes as `paged_decode_attention`."""
    B, Nkv, G, D = dims.batch, dims.num_kv_heads, dims.group, dims.head_dim
    layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(()), 0, dims.num_layers - 1)

    def gather(pages):  # one gather indexed by (layer, page): no copy of the layer's slice of the pool
        rows = pool_storage.to_elements(pool[layer, jnp.clip(pages, 0, dims.num_pages - 1)])
        return rows.reshape(B, dims.capacity, Nkv, D)

    prec = matmul_precision(q.dtype)
    qg = q.reshape(B, Nkv, G, D)
    s = jnp.einsum("bhgd,bthd->bhgt", qg, gather(k_pages), precision=prec, preferred_element_type=jnp.float32)
    s = s * dims.sm_scale
    ok = key_mask(lengths, dims)[:, None, None, :]
    m = jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1, keepdims=True)
    p = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    # Rows past the length may hold anything (even NaN): zero them, not just their weights.
    v = jnp.where(key_mask(lengths, dims)[:, :, None, None], gather(v_pages), 0)
    o = jnp.einsum("bhgt,bthd->bhgd", p.astype(v.dtype), v, precision=prec, preferred_element_type=jnp.float32)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    return o.reshape(B, dims.num_q_heads, D).astype(q.dtype)
