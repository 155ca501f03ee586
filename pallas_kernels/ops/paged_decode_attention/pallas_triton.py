"""Pallas (Triton lowering) paged decode attention reading K/V rows straight from the page pool.

Grid (B, Nkv, NS): program (b, h, s) takes request b's query heads of KV head h (the GQA group of
G heads, padded to BH >= 16 rows so both products run on tl.dot) and the s-th of NS equal spans of
the page table, and runs an online softmax over blocks of BT tokens: the token -> page lookup is a
vector load from the page table, K/V are gathered as [BT, D] rows of the pool (one head's D columns
of each row, 2*D contiguous bytes), masked past the length and before the sliding window.
Blocks wholly outside [max(0, len - window), len) are never visited, so a window also saves bytes.
With NS > 1 (few requests x heads for the SMs) each split writes (o, m, l) and XLA merges them.
Bound: bytes, 2 * len * W * itemsize per request and layer (K and V of all KV heads, each read
once: the G query heads of a group share one program). FLOPs are 4 * G * D per K/V row pair, i.e.
G FLOP/byte at bf16: far below the ridge, so padding G to BH rows costs nothing measurable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels._checks import as_index_vector, cdiv, is_pow2, matmul_precision, next_pow2
from pallas_kernels.ops._paged import NEG, pool_rows, softmax_block
from pallas_kernels.ops.paged_decode_attention.layout import PagedAttentionDims



def unsupported_reason(dims: PagedAttentionDims) -> str | None:
    if not is_pow2(dims.page_rows):
        return f"page_rows must be a power of two, got {dims.page_rows}"
    if not is_pow2(dims.head_dim) or dims.head_dim < 16:
        return f"head_dim must be a power of two >= 16, got {dims.head_dim}"
    return None


def default_num_splits(dims: PagedAttentionDims, block_tokens: int, target_programs: int = 264) -> int:
    """Split the page table when B * Nkv programs would leave SMs idle, keeping >= 4 blocks per split."""
    want = cdiv(target_programs, dims.batch * dims.num_kv_heads)
    return max(1, min(want, dims.capacity // (4 * block_tokens)))


def _attend(layer, b, h, lo, hi, q_ref, k_pages_ref, v_pages_ref, pool_ref, *, dims, bh, bt):
    """Online softmax of the group's queries over keys [lo, hi); returns (o [BH, D], m [BH], l [BH]) f32."""
    R, D = dims.page_rows, dims.head_dim
    q_ok = jnp.arange(bh) < dims.group
    q = _backend.load(q_ref.at[b, pl.ds(h * dims.group, bh), :], mask=q_ok[:, None], other=0)
    cols = (h * D + jnp.arange(D))[None, :]
    prec = matmul_precision(q.dtype)
    blk0 = lo // bt

    rows = functools.partial(pool_rows, row=b, page_rows=R, num_blocks=dims.num_blocks, num_pages=dims.num_pages)

    def body(i, carry):
        tok = (blk0 + i) * bt + jnp.arange(bt)
        ok = (tok >= lo) & (tok < hi)
        return softmax_block(carry, q, pool_ref.at[layer, rows(k_pages_ref, tok=tok), cols],
                             pool_ref.at[layer, rows(v_pages_ref, tok=tok), cols], ok[None, :], ok,
                             sm_scale=dims.sm_scale, precision=prec)

    trips = jnp.maximum(cdiv(hi, bt) - blk0, 0)
    init = (jnp.zeros((bh, D), jnp.float32), jnp.full((bh,), NEG, jnp.float32), jnp.zeros((bh,), jnp.float32))
    return lax.fori_loop(0, jnp.where(hi > lo, trips, 0), body, init)


def _span(lengths_ref, b, split, *, dims, span):
    length = jnp.clip(lengths_ref[b], 0, dims.capacity)
    lo = split * span
    if dims.sliding_window is not None:
        lo = jnp.maximum(lo, length - dims.sliding_window)
    return lo, jnp.minimum(split * span + span, length)


def _kernel_single(layer_ref, lengths_ref, k_pages_ref, v_pages_ref, q_ref, pool_ref, o_ref, *, dims, bh, bt):
    b, h = pl.program_id(0), pl.program_id(1)
    lo, hi = _span(lengths_ref, b, 0, dims=dims, span=dims.capacity)
    o, _, l = _attend(layer_ref[0], b, h, lo, hi, q_ref, k_pages_ref, v_pages_ref, pool_ref, dims=dims, bh=bh, bt=bt)
    out = jnp.where(l[:, None] > 0, o / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    q_ok = jnp.arange(bh) < dims.group
    _backend.store(o_ref.at[b, pl.ds(h * dims.group, bh), :], out.astype(o_ref.dtype), mask=q_ok[:, None])


def _kernel_split(
    layer_ref, lengths_ref, k_pages_ref, v_pages_ref, q_ref, pool_ref, o_ref, m_ref, l_ref, *, dims, bh, bt, span
):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo, hi = _span(lengths_ref, b, split, dims=dims, span=span)
    o, m, l = _attend(layer_ref[0], b, h, lo, hi, q_ref, k_pages_ref, v_pages_ref, pool_ref, dims=dims, bh=bh, bt=bt)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(
    jax.jit, static_argnames=("dims", "interpret", "block_tokens", "num_splits", "num_warps", "num_stages")
)
def paged_decode_attention_pallas(
    q, pool, layer, k_pages, v_pages, lengths, *, dims: PagedAttentionDims, interpret: bool,
    block_tokens: int = 64, num_splits: int | None = None, num_warps: int = 4, num_stages: int = 2,
):
    """Shapes as `paged_decode_attention`; block_tokens (BT) a power of two >= 16."""
    B, Nkv, G, D = dims.batch, dims.num_kv_heads, dims.group, dims.head_dim
    bt = block_tokens
    bh = max(16, next_pow2(G))
    ns = num_splits or default_num_splits(dims, bt)
    span = cdiv(cdiv(dims.capacity, ns), bt) * bt  # aligned to BT so no block straddles two splits
    ns = cdiv(dims.capacity, span)
    pool_rows = pool.reshape(dims.num_layers, dims.num_pages * dims.page_rows, Nkv * D)
    args = _backend.kernel_operands(
        jnp.clip(as_index_vector(layer), 0, dims.num_layers - 1), lengths.astype(jnp.int32),
        k_pages.astype(jnp.int32), v_pages.astype(jnp.int32), q, pool_rows,
    )
    like = args[0]
    whole = pl.no_block_spec
    params = _backend.compiler_params(num_warps=num_warps, num_stages=num_stages)
    if ns == 1:
        return pl.pallas_call(
            functools.partial(_kernel_single, dims=dims, bh=bh, bt=bt),
            out_shape=_backend.output_struct(q.shape, q.dtype, like),
            grid=(B, Nkv),
            in_specs=[whole] * 6,
            out_specs=whole,
            compiler_params=params,
            interpret=interpret,
            name="paged_decode_attention",
        )(*args)
    o, m, l = pl.pallas_call(
        functools.partial(_kernel_split, dims=dims, bh=bh, bt=bt, span=span),
        out_shape=(
            _backend.output_struct((B, ns, Nkv, bh, D), jnp.float32, like),
            _backend.output_struct((B, ns, Nkv, bh), jnp.float32, like),
            _backend.output_struct((B, ns, Nkv, bh), jnp.float32, like),
        ),
        grid=(B, Nkv, ns),
        in_specs=[whole] * 6,
        out_specs=(
            pl.BlockSpec((None, None, None, bh, D), lambda b, h, s: (b, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, bh), lambda b, h, s: (b, s, h, 0)),
            pl.BlockSpec((None, None, None, bh), lambda b, h, s: (b, s, h, 0)),
        ),
        compiler_params=params,
        interpret=interpret,
        name="paged_decode_attention_split",
    )(*args)
    # Merge the splits' partial softmaxes: weights exp(m_s - max_s m_s); empty splits have l = 0.
    m_max = jnp.max(m, axis=1, keepdims=True)
    w = jnp.exp(m - m_max) * (l > 0)
    den = jnp.sum(w * l, axis=1)
    num = jnp.sum(w[..., None] * o, axis=1)
    out = jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
    return out[:, :, :G].reshape(B, dims.num_q_heads, D).astype(q.dtype)
