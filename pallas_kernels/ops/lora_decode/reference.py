"""Plain-JAX multi-adapter LoRA (MBGMV semantics): per-token gather of the adapter tiles + einsum.

This is the "xla" backend. It gathers every token's A and B tiles out of the pool (padded to the
table's max rank, masked to each token's own rank) and contracts them with batched einsums; the
gathered tensor is T x max_rank x (d_in + d_out), which is what makes it slower than the kernel
when adapters are distinct (and why the kernel skips rank blocks instead of masking them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import pool_storage
from pallas_kernels._checks import matmul_precision
from pallas_kernels.ops.lora_layout import LoraDims, token_ranks


def gather_weights(pool, layer, pages, rank, cols: int, dims: LoraDims):
    """Dense per-row weights from page tiles.

    pool: [L, P, R, W]; layer: int32 scalar; pages: [N, C, RB] page ids; rank: [N] valid rank rows.
    Returns [N, RB*R, cols] with rows >= rank and columns >= cols zeroed. One gather indexed by
    (layer, page): slicing pool[layer] first could materialise a whole layer of the pool.
    """
    n, c, rb = pages.shape
    R, W = dims.page_rows, dims.width
    t = pool_storage.to_elements(pool[layer, jnp.clip(pages, 0, dims.num_pages - 1)])  # [N, C, RB, R, W]
    t = t.transpose(0, 2, 3, 1, 4).reshape(n, rb * R, c * W)[:, :, :cols]
    row = jnp.arange(rb * R)
    return jnp.where(row[None, :, None] < rank[:, None, None], t, jnp.zeros((), t.dtype))


def lora_decode_reference(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, *, dims: LoraDims):
    """y + scale * (x A) B per module, each token with its own adapter slot. Shapes as `lora_decode`."""
    W = dims.width
    layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(()), 0, dims.num_layers - 1)
    rank, scale = token_ranks(ranks, scales, token_slot, layer, dims)  # [T, M]
    s = jnp.clip(token_slot, 0, dims.num_slots - 1)
    prec = matmul_precision(pool_storage.element_dtype(pool))
    deltas = []
    for m, d_out in enumerate(dims.out_sizes):
        a = gather_weights(pool, layer, a_pages[s, m], rank[:, m], dims.d_in, dims)  # [T, r, d_in]
        v = jnp.einsum("tk,trk->tr", x, a, precision=prec, preferred_element_type=jnp.float32)
        v = v * scale[:, m, None]
        chunks = -(-d_out // W)
        b = gather_weights(pool, layer, b_pages[s, m, :chunks], rank[:, m], d_out, dims)  # [T, r, d_out]
        deltas.append(
            jnp.einsum("tr,trn->tn", v, b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        )
    delta = jnp.concatenate(deltas, axis=1)
    out = y.astype(jnp.float32) + delta
    return jnp.where((token_slot >= 0)[:, None], out.astype(y.dtype), y)
