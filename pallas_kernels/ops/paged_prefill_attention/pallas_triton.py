"""Pallas (Triton lowering) attention of prompt chunks over K/V already in the page pool.

The chunk's own K/V are written to the pool before this runs, so a chunk that continues a prompt
(its earlier tokens cached by earlier steps) and a chunk that starts one take the same path.
Grid (T/BQ, Nq): program (i, h) takes a block of BQ query tokens and query head h; for each request
with tokens in the block (one, when the engine lays chunks out at multiples of BQ) it runs an online
softmax over that request's keys [lo, max position + 1) in blocks of BT, gathered as [BT, D] rows of
the pool through its page table, masked causally per query token.
Bound: FLOPs for long chunks (4 * D per query-key pair on tensor cores), K/V bytes for short ones
(each head of a GQA group re-reads its KV head's rows, mostly from L2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels._checks import as_index_vector, cdiv, is_pow2, matmul_precision
from pallas_kernels.ops._paged import NEG, pool_rows, softmax_block
from pallas_kernels.ops.paged_prefill_attention.layout import PagedPrefillDims

_BIG = 2**30


def unsupported_reason(dims: PagedPrefillDims) -> str | None:
    if not is_pow2(dims.page_rows):
        return f"page_rows must be a power of two, got {dims.page_rows}"
    if not is_pow2(dims.head_dim) or dims.head_dim < 16:
        return f"head_dim must be a power of two >= 16, got {dims.head_dim}"
    return None


def _attend(row, q_ok, q, pos_q, layer, k_pages_ref, v_pages_ref, pool_ref, *, h, dims, bq, bt):
    """Online softmax of the block's queries of request ``row`` (``q_ok``) over its keys; [BQ, D] f32."""
    R, D = dims.page_rows, dims.head_dim
    safe_row = jnp.clip(row, 0, dims.num_rows - 1)
    hi = jnp.minimum(jnp.max(jnp.where(q_ok, pos_q, -1)) + 1, dims.capacity)
    lo = jnp.int32(0)
    if dims.sliding_window is not None:
        lo = jnp.maximum(jnp.min(jnp.where(q_ok, pos_q, _BIG)) - dims.sliding_window + 1, 0)
    cols = ((h // dims.group) * D + jnp.arange(D))[None, :]
    prec = matmul_precision(q.dtype)
    blk0 = lo // bt

    rows = functools.partial(pool_rows, row=safe_row, page_rows=R, num_blocks=dims.num_blocks,
                             num_pages=dims.num_pages)

    def body(j, carry):
        tok = (blk0 + j) * bt + jnp.arange(bt)
        k_ok = (tok >= lo) & (tok < hi)
        ok = k_ok[None, :] & (tok[None, :] <= pos_q[:, None]) & q_ok[:, None]
        if dims.sliding_window is not None:
            ok &= tok[None, :] > pos_q[:, None] - dims.sliding_window
        return softmax_block(carry, q, pool_ref.at[layer, rows(k_pages_ref, tok=tok), cols],
                             pool_ref.at[layer, rows(v_pages_ref, tok=tok), cols], ok, k_ok,
                             sm_scale=dims.sm_scale, precision=prec)

    trips = jnp.where(hi > lo, cdiv(hi, bt) - blk0, 0)
    init = (jnp.zeros((bq, D), jnp.float32), jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
    o, _, l = lax.fori_loop(0, trips, body, init)
    return jnp.where(l[:, None] > 0, o / jnp.where(l > 0, l, 1.0)[:, None], 0.0)


def _kernel(layer_ref, row_ref, pos_ref, k_pages_ref, v_pages_ref, q_ref, pool_ref, o_ref, *,
            dims: PagedPrefillDims, bq: int, bt: int):
    i, h = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    rows_q = row_ref[pl.ds(i * bq, bq)]
    pos_q = pos_ref[pl.ds(i * bq, bq)]
    valid = (rows_q >= 0) & (rows_q < dims.num_rows)
    q = _backend.load(q_ref.at[pl.ds(i * bq, bq), h, :], mask=valid[:, None], other=0)
    idx = jnp.arange(bq)
    attend = functools.partial(_attend, layer=layer, k_pages_ref=k_pages_ref, v_pages_ref=v_pages_ref,
                               pool_ref=pool_ref, h=h, dims=dims, bq=bq, bt=bt)

    # One pass per request in the block: a single pass when the engine aligns chunks to BQ.
    def more(carry):
        return jnp.sum(carry[1].astype(jnp.int32)) > 0

    def one_request(carry):
        out, todo = carry
        row = jnp.sum(jnp.where(idx == jnp.min(jnp.where(todo, idx, bq)), rows_q, 0))
        mine = todo & (rows_q == row)
        out = jnp.where(mine[:, None], attend(row, mine, q, pos_q), out)
        return out, todo & ~mine

    out, _ = lax.while_loop(more, one_request, (jnp.zeros((bq, dims.head_dim), jnp.float32), valid))
    o_ref[pl.ds(i * bq, bq), h, :] = out.astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("dims", "interpret", "block_q", "block_tokens", "num_warps", "num_stages")
)
def paged_prefill_attention_pallas(
    q, pool, layer, token_row, positions, k_pages, v_pages, *, dims: PagedPrefillDims, interpret: bool,
    block_q: int = 32, block_tokens: int = 64, num_warps: int = 4, num_stages: int = 2,
):
    """Shapes as `paged_prefill_attention`; block_q (BQ) and block_tokens (BT) powers of two >= 16."""
    T = dims.num_tokens
    pad = cdiv(T, block_q) * block_q - T
    qp = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    rows = jnp.pad(token_row.astype(jnp.int32), (0, pad), constant_values=-1)
    pos = jnp.pad(positions.astype(jnp.int32), (0, pad))
    pool_rows = pool.reshape(dims.num_layers, dims.num_pages * dims.page_rows, pool.shape[-1])
    args = _backend.kernel_operands(
        jnp.clip(as_index_vector(layer), 0, dims.num_layers - 1), rows, pos,
        k_pages.astype(jnp.int32), v_pages.astype(jnp.int32), qp, pool_rows,
    )
    out = pl.pallas_call(
        functools.partial(_kernel, dims=dims, bq=block_q, bt=block_tokens),
        out_shape=_backend.output_struct(qp.shape, q.dtype, args[0]),
        grid=(qp.shape[0] // block_q, dims.num_q_heads),
        in_specs=[pl.no_block_spec] * 7,
        out_specs=pl.no_block_spec,
        compiler_params=_backend.compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_prefill_attention",
    )(*args)
    return out[:T]
