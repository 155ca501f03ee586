"""Tiles of tokens that share an adapter slot, derived on device from `token_slot`.

A tile starts at every multiple of TM and at every change of slot, and ends at the next start:
it lies inside one TM-aligned block and one run of equal slots, so it has at most TM tokens.
The number of tiles is ceil(T/TM) + (runs - 1). When the engine sorts tokens by adapter there
are at most S + 1 runs (S slots and -1), so `max_tiles = ceil(T/TM) + min(T - 1, S)` is a static
bound; callers check `count <= max_tiles` and sort the tokens by slot when a caller passed them unsorted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._checks import cdiv


def max_tiles(num_tokens: int, num_slots: int, block_tokens: int) -> int:
    return max(0, cdiv(num_tokens, block_tokens) + min(num_tokens - 1, num_slots))


def segment_tiles(token_slot: jax.Array, block_tokens: int, num_tiles: int):
    """Returns (start [NT], end [NT], slot [NT], count) int32; unused tiles are empty with slot -1."""
    T = token_slot.shape[0]
    i = jnp.arange(T, dtype=jnp.int32)
    changes = jnp.concatenate([jnp.ones((1,), bool), token_slot[1:] != token_slot[:-1]])
    is_start = (i % block_tokens == 0) | changes
    count = jnp.sum(is_start, dtype=jnp.int32)
    (start,) = jnp.nonzero(is_start, size=num_tiles, fill_value=T)
    start = start.astype(jnp.int32)
    end = jnp.concatenate([start[1:], jnp.full((1,), T, jnp.int32)])
    slot = jnp.where(start < T, token_slot[jnp.minimum(start, T - 1)], -1).astype(jnp.int32)
    return start, end, slot, count
