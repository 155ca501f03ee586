"""Public entry of paged decode attention."""

from __future__ import annotations

from typing import Optional

import jax

from pallas_kernels import _backend, pool_storage
from pallas_kernels.ops.paged_decode_attention import layout, pallas_triton
from pallas_kernels.ops.paged_decode_attention.reference import paged_decode_attention_reference

_reference_jit = jax.jit(paged_decode_attention_reference, static_argnames=("dims",))


def paged_decode_attention(
    q: jax.Array,
    pool: jax.Array,
    layer,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float,
    sliding_window: Optional[int] = None,
    implementation: Optional[str] = None,
) -> jax.Array:
    """Attention of one new query token per request over its K/V in the page pool.

    Args:
      q: [B, Nq, D] queries, same dtype as the pool; head h uses KV head h // (Nq // Nkv).
      pool: [L, P, R, W] page pool, W = Nkv * D; token b*R+i of a request sits in row i of its
        block-b page, heads laid out head-major along W.
      layer: int32 scalar (may be traced).
      k_pages, v_pages: [B, NB] int32 page ids of each request's K and V blocks (tail entries past
        the length are never read).
      lengths: [B] int32 tokens written, the query's own included (it sits at position length-1);
        0 marks a padding row, whose output is 0.
      sm_scale: static softmax scale (usually D ** -0.5).
      sliding_window: static; if set, keys at positions <= pos - window are not attended (Mistral).
      implementation: None (Pallas on GPU, XLA elsewhere), "xla" or "pallas".

    Returns:
      [B, Nq, D] in q's dtype.
    """
    dims = layout.validate(
        "paged_decode_attention", q, pool, layer, k_pages, v_pages, lengths, sm_scale, sliding_window
    )
    impl = _backend.resolve(implementation, "paged_decode_attention",
                             pool_storage.pallas_unsupported(pool) or pallas_triton.unsupported_reason(dims))
    if dims.batch == 0 or dims.num_blocks == 0:
        return jax.numpy.zeros_like(q)
    if impl == "xla":
        return _reference_jit(q, pool, layer, k_pages, v_pages, lengths, dims=dims)
    return pallas_triton.paged_decode_attention_pallas(
        q, pool, layer, k_pages, v_pages, lengths, dims=dims, interpret=_backend.interpret_mode()
    )
