"""Public entry of paged prefill attention (prompt chunks over the page pool)."""

from __future__ import annotations

from typing import Optional

import jax

from pallas_kernels import _backend, pool_storage
from pallas_kernels.ops.paged_prefill_attention import layout, pallas_triton
from pallas_kernels.ops.paged_prefill_attention.reference import paged_prefill_attention_reference

_reference_jit = jax.jit(paged_prefill_attention_reference, static_argnames=("dims",))

# Query tokens per Pallas program: callers that lay chunks out at multiples of this never mix two
# requests in one program (mixing is correct, only slower).
BLOCK_Q = 32


def paged_prefill_attention(
    q: jax.Array,
    pool: jax.Array,
    layer,
    token_row: jax.Array,
    positions: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    *,
    sm_scale: float,
    sliding_window: Optional[int] = None,
    implementation: Optional[str] = None,
) -> jax.Array:
    """Causal attention of query tokens over their requests' K/V in the page pool (chunked prefill).

    Every query token's own K/V must already be in the pool (written by `write_kv` in the same layer),
    as well as those of every earlier position of its request.

    Args:
      q: [T, Nq, D] queries, same dtype as the pool; head h uses KV head h // (Nq // Nkv).
      pool: [L, P, R, W] page pool, W = Nkv * D (layout as `paged_decode_attention`).
      layer: int32 scalar (may be traced).
      token_row: [T] int32 request (row of the page tables) of each token; -1 = not a query here
        (padding, or a token another kernel attends): its output is 0.
      positions: [T] int32 position of each token in its request: it attends keys 0..position.
      k_pages, v_pages: [rows, NB] int32 page ids of each request's K and V blocks.
      sm_scale: static softmax scale.
      sliding_window: static; if set, keys at positions <= pos - window are not attended.
      implementation: None (Pallas on GPU, XLA elsewhere), "xla" or "pallas".

    The Pallas kernel is fastest when each request's tokens start at a multiple of BLOCK_Q.

    Returns:
      [T, Nq, D] in q's dtype.
    """
    dims = layout.validate("paged_prefill_attention", q, pool, layer, token_row, positions, k_pages, v_pages,
                           sm_scale, sliding_window)
    impl = _backend.resolve(implementation, "paged_prefill_attention",
                             pool_storage.pallas_unsupported(pool) or pallas_triton.unsupported_reason(dims))
    if dims.num_tokens == 0 or dims.num_rows == 0 or dims.num_blocks == 0:
        return jax.numpy.zeros_like(q)
    if impl == "xla":
        return _reference_jit(q, pool, layer, token_row, positions, k_pages, v_pages, dims=dims)
    return pallas_triton.paged_prefill_attention_pallas(
        q, pool, layer, token_row, positions, k_pages, v_pages, dims=dims, interpret=_backend.interpret_mode(),
        block_q=BLOCK_Q,
    )
