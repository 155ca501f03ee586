"""Public entry of multi-adapter LoRA for decode."""

from __future__ import annotations

from typing import Optional, Sequence

import jax

from pallas_kernels import _backend, pool_storage
from pallas_kernels._errors import KernelInputError
from pallas_kernels.ops.lora_decode import pallas_triton
from pallas_kernels.ops.lora_decode.reference import lora_decode_reference
from pallas_kernels.ops.lora_layout import sanitize_slots, validate_lora_args

_reference_jit = jax.jit(lora_decode_reference, static_argnames=("dims",))


def lora_decode(
    y: jax.Array,
    x: jax.Array,
    pool: jax.Array,
    layer,
    a_pages: jax.Array,
    b_pages: jax.Array,
    ranks: jax.Array,
    scales: jax.Array,
    token_slot: jax.Array,
    *,
    out_sizes: Sequence[int],
    implementation: Optional[str] = None,
    fused: bool = False,
    k_splits: Optional[int] = None,
    grouping: Optional[str] = None,
) -> jax.Array:
    """Add each token's LoRA delta to the base output of M fused projections (one row per token).

    Args:
      y: [T, sum(out_sizes)] base output; module m owns columns [off_m, off_m + out_sizes[m]).
      x: [T, d_in] input shared by the M modules, same dtype as the pool.
      pool: [L, P, R, W] page pool holding the adapters' A^T / B tiles (see `ops.lora_layout`).
      layer: int32 scalar (may be traced), the layer whose tiles are read.
      a_pages: [S, M, ceil(d_in/W), RB] int32 page ids of A^T tiles per slot/module/chunk/rank block.
      b_pages: [S, M, CHout_max, RB] int32 page ids of B tiles; module m uses ceil(out_sizes[m]/W) chunks.
      ranks: [S, L, M] int32 rank per slot/layer/module (0 = not adapted; blocks past it are skipped).
      scales: [S, L, M] float32 LoRA scale (alpha / r, or alpha / sqrt(r)).
      token_slot: [T] int32 adapter slot of each token; -1 (or any id outside [0, S)) = no adapter:
        that row is returned unchanged.
      out_sizes: static tuple of each module's output columns.
      implementation: None (Pallas on GPU, XLA elsewhere), "xla" or "pallas" (interpret mode off-GPU).
      grouping: Pallas only; the default is `pallas_triton.DEFAULT_GROUPING` ("none"). "kernel": tokens that share an
        adapter slot are grouped per step into tiles of up to 16 that read the adapter's weights once, with
        tl.dot, each program finding its tile in the slot table itself; a token alone on its adapter runs the
        per-token loop. "sort": the same tiles from a plan XLA computes first (a stable sort of the slots).
        "runs": tiles of consecutive tokens only (no sort; for callers that order tokens by adapter).
        "none": the per-token kernels for every token (the default). Every choice gives the same
        result; they differ in speed.
      fused: Pallas only: one kernel per (token, module) instead of separate shrink and expand kernels
        (measured slower on the H200; kept for comparison, see `pallas_triton`). Implies grouping="none".
      k_splits: Pallas per-token kernels only: programs that share one rank block's pass over d_in. None
        (the default) picks by batch size: 1 above `pallas_triton.SMALL_BATCH_TOKENS` tokens (at T = 256, 2
        measured no faster on the H200 and 4 slower), up to 8 at or below it. Any other value implies
        grouping="none".

    Returns:
      [T, sum(out_sizes)] in y's dtype: y + scale * (x A) B per module, accumulated in float32.
      The Pallas path updates y in place when the caller donates it.
    """
    dims = validate_lora_args("lora_decode", y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, out_sizes)
    if grouping is not None and grouping not in pallas_triton.GROUPINGS:
        raise KernelInputError(f"lora_decode: grouping must be None or one of {pallas_triton.GROUPINGS}, "
                               f"got {grouping!r}")
    if grouping is None and (fused or k_splits not in (None, 1)):
        grouping = "none"  # both are knobs of the per-token kernels
    impl = _backend.resolve(implementation, "lora_decode",
                             pool_storage.pallas_unsupported(pool) or pallas_triton.unsupported_reason(dims))
    if dims.num_tokens == 0:
        return y
    token_slot = sanitize_slots(token_slot, dims)
    if impl == "xla":
        return _reference_jit(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, dims=dims)
    return pallas_triton.lora_decode_pallas(
        y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, dims=dims, interpret=_backend.interpret_mode(),
        fused=fused, k_splits=k_splits, grouping=grouping,
    )
