"""Public entry of multi-adapter LoRA for prefill."""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _backend, pool_storage
from pallas_kernels._errors import KernelInputError
from pallas_kernels.ops.lora_layout import sanitize_slots, slot_or_none, validate_lora_args
from pallas_kernels.ops.lora_prefill import pallas_triton, tiles
from pallas_kernels.ops.lora_prefill.reference import lora_prefill_reference

_reference_jit = jax.jit(lora_prefill_reference, static_argnames=("dims", "method"))


def lora_prefill(
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
    block_tokens: int = 64,
    slots_in_runs: bool = False,
    tiles: Optional[tuple] = None,
) -> jax.Array:
    """Add each token's LoRA delta to the base output, for runs of tokens sharing an adapter slot.

    Same arguments and result as `lora_decode` (y [T, sum(out_sizes)], x [T, d_in], pool [L, P, R, W],
    layer scalar, a_pages [S, M, CHin, RB], b_pages [S, M, CHout_max, RB], ranks/scales [S, L, M],
    token_slot [T] with -1 = no adapter). Fast when tokens of one slot are consecutive (the engine
    sorts requests by adapter); any order is correct: the Pallas path works on at most
    ceil(T/block_tokens) + min(T-1, S) tiles and, if the slots need more, it runs on the tokens sorted
    by slot (a gather and a scatter of x and y more).
    block_tokens (TM): tokens per tile of the Pallas path, a power of two >= 16.
    slots_in_runs: the caller guarantees that each slot's tokens are consecutive (at most S + 1 runs, -1
      included). The Pallas path then runs on the tokens as given with no device-side check: that check
      is a `cond`, whose predicate XLA:GPU reads on the host, holding the dispatching thread until the
      step has run that far (once per call, i.e. per layer and projection group).
    tiles: the Pallas path's tile list, `lora_prefill_tiles(token_slot, S, block_tokens)`, computed once for
      every call of a step (it depends on the slots only; computed per call it is a scatter, scans and a
      gather, 15-19 us on the H200 beside ~130 us of kernels). Needs slots_in_runs; the XLA path ignores it.
    """
    dims = validate_lora_args("lora_prefill", y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, out_sizes)
    if block_tokens < 16 or block_tokens & (block_tokens - 1):
        raise KernelInputError(f"lora_prefill: block_tokens must be a power of two >= 16, got {block_tokens}")
    if tiles is not None:
        _check_tiles(tiles, dims, block_tokens, slots_in_runs)
    impl = _backend.resolve(implementation, "lora_prefill",
                             pool_storage.pallas_unsupported(pool) or pallas_triton.unsupported_reason(dims))
    if dims.num_tokens == 0:
        return y
    args = (y, x, pool, layer, a_pages, b_pages, ranks, scales, sanitize_slots(token_slot, dims))
    if impl == "xla":
        return _reference_jit(*args, dims=dims)
    return _prefill_pallas_or_fallback(*args, tiles, dims=dims, block_tokens=block_tokens, slots_in_runs=slots_in_runs)


def lora_prefill_tiles(token_slot: jax.Array, num_slots: int, block_tokens: int = 64) -> tuple:
    """The tile list of `lora_prefill(..., slots_in_runs=True, tiles=...)` for this slot table (S = num_slots):
    (start, end, slot) int32 [ceil(T / block_tokens) + min(T - 1, S)], tiles of at most block_tokens tokens of
    one slot, unused ones empty. Depends on the slots only, so one list serves every layer and projection
    group of a step."""
    if getattr(token_slot, "ndim", None) != 1:
        raise KernelInputError(f"lora_prefill_tiles: token_slot must be a vector [T], got shape "
                               f"{getattr(token_slot, 'shape', None)}")
    if int(num_slots) < 1:
        raise KernelInputError(f"lora_prefill_tiles: num_slots must be >= 1, got {num_slots}")
    if block_tokens < 16 or block_tokens & (block_tokens - 1):
        raise KernelInputError(f"lora_prefill_tiles: block_tokens must be a power of two >= 16, got {block_tokens}")
    slot = jnp.asarray(token_slot).astype(jnp.int32)
    T = slot.shape[0]
    if T == 0:
        return tuple(jnp.zeros((0,), jnp.int32) for _ in range(3))
    slot = slot_or_none(slot, int(num_slots))
    return tiles.segment_tiles(slot, block_tokens, tiles.max_tiles(T, int(num_slots), block_tokens))[:3]


def _check_tiles(tile_list, dims, block_tokens: int, slots_in_runs: bool) -> None:
    if not slots_in_runs:
        raise KernelInputError("lora_prefill: tiles= needs slots_in_runs=True (a tile list holds runs of one slot)")
    nt = tiles.max_tiles(dims.num_tokens, dims.num_slots, block_tokens)
    is_seq = isinstance(tile_list, (tuple, list))
    if not is_seq or len(tile_list) != 3 or not all(
            getattr(a, "shape", None) == (nt,) and jnp.issubdtype(a.dtype, jnp.integer) for a in tile_list):
        got = ([(getattr(a, "shape", type(a).__name__), str(getattr(a, "dtype", ""))) for a in tile_list] if is_seq
               else type(tile_list).__name__)
        raise KernelInputError(
            f"lora_prefill: tiles must be (start, end, slot) int vectors of {nt} tiles from lora_prefill_tiles("
            f"token_slot, {dims.num_slots}, {block_tokens}), got {got}")


@functools.partial(jax.jit, static_argnames=("dims", "block_tokens", "slots_in_runs"))
def _prefill_pallas_or_fallback(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, given_tiles=None, *,
                                dims, block_tokens, slots_in_runs=False):
    """The kernel on the tokens as given when their slots come in runs (the engine's order); otherwise on
    the tokens sorted by slot, then put back. Both branches are Pallas: XLA reserves the working memory of
    every branch of a `cond` whichever runs, and an XLA `ragged_dot` fallback here asked for 8.5 GiB at
    4096 tokens on the H200 (a prefill step out of memory, though the branch never ran)."""
    nt = tiles.max_tiles(dims.num_tokens, dims.num_slots, block_tokens)
    slot = token_slot.astype("int32")
    args = (pool, layer, a_pages, b_pages, ranks, scales)

    def kernel(y, x, tile_list):
        return pallas_triton.lora_prefill_pallas(
            y, x, *args, tuple(a.astype(jnp.int32) for a in tile_list[:3]), dims=dims,
            interpret=_backend.interpret_mode(), num_tiles=nt, block_tokens=block_tokens,
        )

    if given_tiles is not None:
        return kernel(y, x, given_tiles)
    tile_list = tiles.segment_tiles(slot, block_tokens, nt)

    def as_given(_):
        return kernel(y, x, tile_list)

    if slots_in_runs:
        return as_given(None)

    def sorted_by_slot(_):
        # Sorted, the slots form at most S + 1 runs (-1 included), which the static tile list always holds.
        order = jnp.argsort(jnp.where(slot >= 0, slot, dims.num_slots), stable=True)
        out = kernel(y[order], x[order], tiles.segment_tiles(slot[order], block_tokens, nt))
        return jnp.zeros_like(out).at[order].set(out)

    return lax.cond(tile_list[3] <= nt, as_given, sorted_by_slot, None)
