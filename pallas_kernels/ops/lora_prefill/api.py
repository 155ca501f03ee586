"""Public entry of multi-adapter LoRA for prefill."""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
from jax import lax

from pallas_kernels import _backend
from pallas_kernels._errors import KernelInputError
from pallas_kernels.ops.lora_layout import sanitize_slots, validate_lora_args
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
) -> jax.Array:
    """Add each token's LoRA delta to the base output, for runs of tokens sharing an adapter slot.

    Same arguments and result as `lora_decode` (y [T, sum(out_sizes)], x [T, d_in], pool [L, P, R, W],
    layer scalar, a_pages [S, M, CHin, RB], b_pages [S, M, CHout_max, RB], ranks/scales [S, L, M],
    token_slot [T] with -1 = no adapter). Fast when tokens of one slot are consecutive (the engine
    sorts requests by adapter); any order is correct: the Pallas path works on at most
    ceil(T/block_tokens) + min(T-1, S) tiles and, if the slots need more, the call runs the XLA path.
    block_tokens (TM): tokens per tile of the Pallas path, a power of two >= 16.
    """
    dims = validate_lora_args("lora_prefill", y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, out_sizes)
    if block_tokens < 16 or block_tokens & (block_tokens - 1):
        raise KernelInputError(f"lora_prefill: block_tokens must be a power of two >= 16, got {block_tokens}")
    impl = _backend.resolve(implementation, "lora_prefill", pallas_triton.unsupported_reason(dims))
    if dims.num_tokens == 0:
        return y
    args = (y, x, pool, layer, a_pages, b_pages, ranks, scales, sanitize_slots(token_slot, dims))
    if impl == "xla":
        return _reference_jit(*args, dims=dims)
    return _prefill_pallas_or_fallback(*args, dims=dims, block_tokens=block_tokens)


@functools.partial(jax.jit, static_argnames=("dims", "block_tokens"))
def _prefill_pallas_or_fallback(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, *, dims, block_tokens):
    nt = tiles.max_tiles(dims.num_tokens, dims.num_slots, block_tokens)
    tile_list = tiles.segment_tiles(token_slot.astype("int32"), block_tokens, nt)
    count = tile_list[3]
    args = (y, x, pool, layer, a_pages, b_pages, ranks, scales)

    def kernel(_):
        return pallas_triton.lora_prefill_pallas(
            *args, tile_list[:3], dims=dims, interpret=_backend.interpret_mode(), num_tiles=nt,
            block_tokens=block_tokens,
        )

    def fallback(_):
        return lora_prefill_reference(*args, token_slot, dims=dims)

    return lax.cond(count <= nt, kernel, fallback, None)
