"""Plain-JAX multi-adapter LoRA for many tokens: grouped matmuls over tokens sorted by slot.

This is the "xla" backend of `lora_prefill`. Two methods:
  "ragged"  unpack every slot's A and B from the pool once ([S, d_in, M*r] and [S, r, d_out], rows
            past each slot's rank zeroed), sort tokens by slot, and run `jax.lax.ragged_dot` for the
            shrink (all modules at once) and the expand (per module). Cost independent of T in
            weight bytes: good for long prompts.
  "gather"  the per-token gather of `lora_decode_reference`: good when T is small against S.
"auto" picks "gather" when T <= 2 * S (the per-token gather then moves no more weight bytes than
unpacking every slot would) and "ragged" otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import pool_storage
from pallas_kernels._checks import matmul_precision
from pallas_kernels.ops.lora_decode.reference import gather_weights, lora_decode_reference
from pallas_kernels.ops.lora_layout import LoraDims, token_ranks


def _ragged(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, dims: LoraDims):
    S, M, W = dims.num_slots, dims.num_modules, dims.width
    RK = dims.max_rank
    layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(()), 0, dims.num_layers - 1)
    slot_rank = jnp.clip(ranks[:, layer].astype(jnp.int32), 0, RK)  # [S, M]
    prec = matmul_precision(pool_storage.element_dtype(pool))
    # Group S is "no adapter": zero weights, so those tokens get a zero delta.
    key = jnp.where(token_slot >= 0, jnp.clip(token_slot, 0, S - 1), S)
    order = jnp.argsort(key, stable=True)
    inverse = jnp.argsort(order)
    group_sizes = jnp.bincount(key, length=S + 1).astype(jnp.int32)
    xs = x[order]

    a = jnp.stack(
        [gather_weights(pool, layer, a_pages[:, m], slot_rank[:, m], dims.d_in, dims) for m in range(M)], axis=1
    )  # [S, M, RK, d_in]
    a = a.transpose(0, 3, 1, 2).reshape(S, dims.d_in, M * RK)
    a = jnp.concatenate([a, jnp.zeros((1,) + a.shape[1:], a.dtype)])
    v = jax.lax.ragged_dot(xs, a, group_sizes, precision=prec, preferred_element_type=jnp.float32)  # [T, M*RK]
    _, scale = token_ranks(ranks, scales, token_slot, layer, dims)
    v = v.reshape(-1, M, RK) * scale[order][:, :, None]

    deltas = []
    for m, d_out in enumerate(dims.out_sizes):
        chunks = -(-d_out // W)
        b = gather_weights(pool, layer, b_pages[:, m, :chunks], slot_rank[:, m], d_out, dims)  # [S, RK, d_out]
        b = jnp.concatenate([b, jnp.zeros((1,) + b.shape[1:], b.dtype)])
        deltas.append(
            jax.lax.ragged_dot(
                v[:, m].astype(b.dtype), b, group_sizes, precision=prec, preferred_element_type=jnp.float32
            )
        )
    delta = jnp.concatenate(deltas, axis=1)[inverse]
    out = (y.astype(jnp.float32) + delta).astype(y.dtype)
    return jnp.where((token_slot >= 0)[:, None], out, y)


def lora_prefill_reference(
    y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, *, dims: LoraDims, method: str = "auto"
):
    """y + scale * (x A) B per module and token. Shapes as `lora_prefill`; method "auto" | "ragged" | "gather"."""
    if method == "auto":
        method = "gather" if dims.num_tokens <= 2 * dims.num_slots else "ragged"
    if method == "gather":
        return lora_decode_reference(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, dims=dims)
    if method == "ragged":
        return _ragged(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, dims)
    raise ValueError(f"method must be 'auto', 'ragged' or 'gather', got {method!r}")
