"""Public entry of packed prefill attention."""

from __future__ import annotations

from typing import Optional

import jax

from pallas_kernels import _backend
from pallas_kernels.ops.prefill_attention import layout, pallas_triton
from pallas_kernels.ops.prefill_attention.reference import prefill_attention_reference

_reference_jit = jax.jit(prefill_attention_reference, static_argnames=("dims",))


def prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    *,
    sm_scale: float,
    sliding_window: Optional[int] = None,
    implementation: Optional[str] = None,
) -> jax.Array:
    """Causal attention within each packed sequence.

    Args:
      q: [T, Nq, D]; k, v: [T, Nkv, D] (same dtype), Nq a multiple of Nkv (head h uses KV head h // G).
      segment_ids: [T] int32 sequence of each token, -1 = padding (output 0).
      positions: [T] int32 position of each token in its sequence.
      sm_scale: static softmax scale.
      sliding_window: static; if set, keys at positions <= pos - window are not attended.
      implementation: None (Pallas on GPU, XLA elsewhere), "xla" or "pallas".

    Token i attends token j iff segment_ids[i] == segment_ids[j] >= 0 and positions[j] <= positions[i]
    (and positions[j] > positions[i] - sliding_window). Tokens of one sequence need not be
    contiguous, but the Pallas kernel is fastest when they are.

    Returns:
      [T, Nq, D] in q's dtype.
    """
    dims = layout.validate("prefill_attention", q, k, v, segment_ids, positions, sm_scale, sliding_window)
    impl = _backend.resolve(implementation, "prefill_attention", pallas_triton.unsupported_reason(dims))
    if dims.num_tokens == 0:
        return q
    if impl == "xla":
        return _reference_jit(q, k, v, segment_ids, positions, dims=dims)
    return pallas_triton.prefill_attention_pallas(
        q, k, v, segment_ids, positions, dims=dims, interpret=_backend.interpret_mode()
    )
