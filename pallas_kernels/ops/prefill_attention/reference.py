"""Plain-JAX packed causal attention: dense [T, T] scores with a segment/position mask.

The "xla" backend. Memory and time O(Nq * T^2): fine for the engine's CPU path and short packs;
the Pallas kernel skips the blocks the mask empties.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._checks import matmul_precision
from pallas_kernels.ops.prefill_attention.layout import PrefillAttentionDims


def attention_mask(segment_ids, positions, sliding_window):
    """[T, T] bool: query i attends key j (same non-negative segment, not later, within the window)."""
    seg_q, seg_k = segment_ids[:, None], segment_ids[None, :]
    pos_q, pos_k = positions[:, None], positions[None, :]
    ok = (seg_q == seg_k) & (seg_q >= 0) & (pos_k <= pos_q)
    if sliding_window is not None:
        ok &= pos_k > pos_q - sliding_window
    return ok


def prefill_attention_reference(q, k, v, segment_ids, positions, *, dims: PrefillAttentionDims):
    """Shapes as `prefill_attention`."""
    T, Nkv, G, D = dims.num_tokens, dims.num_kv_heads, dims.group, dims.head_dim
    prec = matmul_precision(q.dtype)
    qg = q.reshape(T, Nkv, G, D)
    s = jnp.einsum("thgd,shd->hgts", qg, k, precision=prec, preferred_element_type=jnp.float32) * dims.sm_scale
    ok = attention_mask(segment_ids, positions, dims.sliding_window)[None, None]
    m = jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1, keepdims=True)
    p = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("hgts,shd->thgd", p.astype(v.dtype), v, precision=prec, preferred_element_type=jnp.float32)
    l = l[..., 0].transpose(2, 0, 1)[..., None]  # [T, Nkv, G, 1]
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    return o.reshape(T, dims.num_q_heads, D).astype(q.dtype)
