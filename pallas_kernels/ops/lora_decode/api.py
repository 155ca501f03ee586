"""Public entry of multi-adapter LoRA for decode."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import _backend, pool_storage
from pallas_kernels._errors import KernelInputError
from pallas_kernels.ops.lora_decode import pallas_triton, tiles_triton
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
    plan: Optional[tuple] = None,
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
        "tiles": tiles of up to 16 tokens of one slot from a sorted plan (`lora_decode_plan`), each tile's
        shrink and expand one tl.dot per block, the tile index the grids' last axis: the fastest where many
        tokens share few adapters, and slow where every token has its own (`lora_decode_grouping` picks per step).
        "none": the per-token kernels for every token (the default). Every choice gives the same
        result; they differ in speed.
      fused: Pallas only: one kernel per (token, module) instead of separate shrink and expand kernels
        (measured slower on the H200; kept for comparison, see `pallas_triton`). Implies grouping="none".
      k_splits: Pallas per-token kernels only: programs that share one rank block's pass over d_in. None
        (the default) picks by batch size: 1 above `pallas_triton.SMALL_BATCH_TOKENS` tokens (at T = 256, 2
        measured no faster on the H200 and 4 slower), up to 8 at or below it. Any other value implies
        grouping="none".
      plan: grouping "tiles" only: `lora_decode_plan(token_slot, S)`, computed once where one step calls the
        op for every layer and projection group (the plan is a sort and a few scans, ~17 us on the H200: as
        much as the op itself); None computes it in the call. The tile kernels take every token's slot from
        the plan and do not read token_slot: a plan made from other slots applies other adapters (only its
        shapes are checked).

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
    if plan is not None and grouping != "tiles":
        raise KernelInputError(f"lora_decode: a plan is for grouping='tiles', got grouping={grouping!r}")
    impl = _backend.resolve(implementation, "lora_decode",
                             pool_storage.pallas_unsupported(pool) or pallas_triton.unsupported_reason(dims))
    if dims.num_tokens == 0:
        return y
    if plan is not None:
        _check_plan(plan, dims)
    if impl == "xla":
        return _reference_jit(y, x, pool, layer, a_pages, b_pages, ranks, scales, sanitize_slots(token_slot, dims),
                              dims=dims)
    # The Pallas paths treat ids outside [0, S) as no adapter themselves (an XLA pass here was a launch per call).
    token_slot = jnp.asarray(token_slot).astype(jnp.int32)
    return pallas_triton.lora_decode_pallas(
        y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, plan, dims=dims,
        interpret=_backend.interpret_mode(), fused=fused, k_splits=k_splits, grouping=grouping,
    )


def lora_decode_plan(token_slot: jax.Array, num_slots: int) -> tuple:
    """The tile plan of `lora_decode(..., grouping="tiles")` for this slot table (S = num_slots; ids outside
    [0, S) are no adapter): a stable sort by slot, cut into tiles of at most 16 tokens of one slot. Depends on
    the slots only, so one plan serves every layer and projection group of a step."""
    if getattr(token_slot, "ndim", None) != 1:
        raise KernelInputError(f"lora_decode_plan: token_slot must be a vector [T], got shape "
                               f"{getattr(token_slot, 'shape', None)}")
    if int(num_slots) < 1:
        raise KernelInputError(f"lora_decode_plan: num_slots must be >= 1, got {num_slots}")
    token_slot = jnp.asarray(token_slot).astype(jnp.int32)
    if token_slot.shape[0] == 0:
        return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32)
    return tiles_triton.tile_plan(token_slot, int(num_slots))


# Batches of at most this many adapted tokens keep the per-token kernels: at 1-16 tokens their small-batch knobs
# beat the tiles (8 tokens on one adapter: 8.9 against 13.0 us on the H200, benchmarks/NOTES.md). Its own value,
# not pallas_triton.SMALL_BATCH_TOKENS, which a benchmark may change.
TILES_MIN_TOKENS = 16


def lora_decode_may_tile(num_tokens: int) -> bool:
    """Whether a decode batch of this many rows can ever be given the tile kernels (`lora_decode_grouping`): an
    engine compiles its tiles programs for these sizes only."""
    return num_tokens > TILES_MIN_TOKENS


def lora_decode_grouping(slots: Sequence) -> str:
    """"tiles" or "none" for a decode batch whose tokens have these adapters (any hashable ids; None = no
    adapter), on the host before the step: tiles for more than TILES_MIN_TOKENS adapted tokens whose tile count
    is at most a third of them. Each tile costs ~0.4 us more on the H200; with every token on its own adapter
    the tiles take twice the per-token kernels' time (benchmarks/NOTES.md, 2026-12-01)."""
    used = [s for s in slots if s is not None]
    n = len(used)
    if not lora_decode_may_tile(n):
        return "none"
    tiles = -(-n // tiles_triton.TILE_TOKENS) + len(set(used))
    return "tiles" if 3 * tiles <= n else "none"


def _check_plan(plan, dims) -> None:
    nt = tiles_triton.num_tiles(dims.num_tokens, dims.num_slots)
    want = ((nt * tiles_triton.TILE_TOKENS,), (nt,))
    got = tuple(tuple(getattr(a, "shape", ())) for a in plan) if isinstance(plan, (tuple, list)) else None
    if got != want:
        raise KernelInputError(f"lora_decode: plan must be lora_decode_plan(token_slot, {dims.num_slots}) for "
                               f"{dims.num_tokens} tokens (shapes {want}), got shapes {got}")
