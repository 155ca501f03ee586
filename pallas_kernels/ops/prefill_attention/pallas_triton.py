"""Pallas (Triton lowering) flash attention over packed variable-length causal sequences.

Grid (T/BQ, Nq): program (i, h) keeps a [BQ, D] query block of head h and runs an online softmax
over key blocks of KV head h // G. Which key blocks: precomputed per query block on device from
segment_ids (`block_ranges`): when every segment is one contiguous run (the engine's packing),
[start of the block's first run, end of its last run); otherwise every block. Inside that range a
block is skipped outright (no loads) when per-block summaries prove it empty: its segment range
misses the query block's, its first position is after the query block's last, or (sliding
window) all its positions are too old. Masking inside visited blocks is exact, so skipping is
only an optimisation and any segment/position layout is correct.
Bound: FLOPs for long segments (4 * D per query-key pair on tensor cores: ~T_seg^2 * 2 * D * Nq
per segment after causal skipping), bytes for short ones (q, k, v, o each once, K/V re-read per
query block and per head of a GQA group, mostly from L2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels._checks import cdiv, is_pow2, matmul_precision
from pallas_kernels.ops.prefill_attention.layout import PrefillAttentionDims

_NEG = -1e30
_BIG = 2**30


def unsupported_reason(dims: PrefillAttentionDims) -> str | None:
    if not is_pow2(dims.head_dim) or dims.head_dim < 16:
        return f"head_dim must be a power of two >= 16, got {dims.head_dim}"
    return None


def _block_reduce(x, block, fn, fill):
    return fn(x.reshape(-1, block), axis=1, initial=fill)


def block_ranges(segment_ids, positions, block: int):
    """Per-block tables, all int32 [T/block] (T padded up to a multiple of block with segment -1).

    Returns (segment ids and positions padded, and per block: key-range start/end block for the
    query block, min/max segment, min/max position over its non-padding tokens).
    """
    T = segment_ids.shape[0]
    pad = cdiv(T, block) * block - T
    seg = jnp.pad(segment_ids.astype(jnp.int32), (0, pad), constant_values=-1)
    pos = jnp.pad(positions.astype(jnp.int32), (0, pad))
    n = seg.shape[0]
    valid = seg >= 0
    idx = jnp.arange(n, dtype=jnp.int32)
    prev = jnp.concatenate([jnp.full((1,), -1, jnp.int32), seg[:-1]])
    nxt = jnp.concatenate([seg[1:], jnp.full((1,), -1, jnp.int32)])
    starts = valid & (seg != prev)
    ends = valid & (seg != nxt)
    run_lo = lax.cummax(jnp.where(starts, idx, 0))
    run_hi = lax.cummin(jnp.where(ends, idx + 1, n), reverse=True)
    ordered = jnp.sort(jnp.where(valid, seg, _BIG))
    distinct = jnp.sum((ordered != jnp.concatenate([jnp.full((1,), -2, jnp.int32), ordered[:-1]])) & (ordered < _BIG))
    contiguous = jnp.sum(starts) == distinct

    lo = _block_reduce(jnp.where(valid, run_lo, n), block, jnp.min, n)
    hi = _block_reduce(jnp.where(valid, run_hi, 0), block, jnp.max, 0)
    any_valid = hi > 0
    nblocks = n // block
    kb_lo = jnp.where(contiguous, lo // block, 0)
    kb_hi = jnp.where(contiguous, cdiv(hi, block), nblocks)
    kb_lo = jnp.where(any_valid, kb_lo, 0).astype(jnp.int32)
    kb_hi = jnp.where(any_valid, kb_hi, 0).astype(jnp.int32)
    seg_min = _block_reduce(jnp.where(valid, seg, _BIG), block, jnp.min, _BIG)
    seg_max = _block_reduce(jnp.where(valid, seg, -1), block, jnp.max, -1)
    pos_min = _block_reduce(jnp.where(valid, pos, _BIG), block, jnp.min, _BIG)
    pos_max = _block_reduce(jnp.where(valid, pos, -_BIG), block, jnp.max, -_BIG)
    return seg, pos, jnp.stack([kb_lo, kb_hi, seg_min, seg_max, pos_min, pos_max], axis=1)


def _kernel(seg_ref, pos_ref, summ_ref, q_ref, k_ref, v_ref, o_ref, *, dims: PrefillAttentionDims, bq: int):
    i, h = pl.program_id(0), pl.program_id(1)
    T, D = dims.num_tokens, dims.head_dim
    kvh = h // dims.group
    q_rows = i * bq + jnp.arange(bq)
    q_ok = q_rows < T
    q = _backend.load(q_ref.at[pl.ds(i * bq, bq), h, :], mask=q_ok[:, None], other=0)
    seg_q = seg_ref[pl.ds(i * bq, bq)]
    pos_q = pos_ref[pl.ds(i * bq, bq)]
    kb_lo, kb_hi, qs_min, qs_max, qp_min, qp_max = (summ_ref[i, c] for c in range(6))
    prec = matmul_precision(q.dtype)
    window = dims.sliding_window

    def visit(kb, carry):
        o, m, l = carry
        k_rows = kb * bq + jnp.arange(bq)
        k_ok = k_rows < T
        k = _backend.load(k_ref.at[pl.ds(kb * bq, bq), kvh, :], mask=k_ok[:, None], other=0)
        seg_k = seg_ref[pl.ds(kb * bq, bq)]
        pos_k = pos_ref[pl.ds(kb * bq, bq)]
        ok = (seg_q[:, None] == seg_k[None, :]) & (seg_q >= 0)[:, None] & (pos_k[None, :] <= pos_q[:, None])
        if window is not None:
            ok &= pos_k[None, :] > pos_q[:, None] - window
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)
        s = jnp.where(ok, s * dims.sm_scale, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        v = _backend.load(v_ref.at[pl.ds(kb * bq, bq), kvh, :], mask=k_ok[:, None], other=0)
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
        )
        return alpha[:, None] * o + pv, m_new, alpha * l + jnp.sum(p, axis=1)

    def body(kb, carry):
        ks_min, ks_max, kp_min, kp_max = (summ_ref[kb, c] for c in range(2, 6))
        empty = (ks_max < qs_min) | (ks_min > qs_max) | (kp_min > qp_max)
        if window is not None:
            empty |= kp_max <= qp_min - window
        return lax.cond(empty, lambda c: c, functools.partial(visit, kb), carry)

    init = (jnp.zeros((bq, D), jnp.float32), jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
    o, _, l = lax.fori_loop(kb_lo, kb_hi, body, init)
    out = jnp.where(l[:, None] > 0, o / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    _backend.store(o_ref.at[pl.ds(i * bq, bq), h, :], out.astype(o_ref.dtype), mask=q_ok[:, None])


@functools.partial(jax.jit, static_argnames=("dims", "interpret", "block", "num_warps", "num_stages"))
def prefill_attention_pallas(
    q, k, v, segment_ids, positions, *, dims: PrefillAttentionDims, interpret: bool, block: int = 64,
    num_warps: int = 4, num_stages: int = 2,
):
    """Shapes as `prefill_attention`; block = BQ = BK, a power of two >= 16."""
    seg, pos, summary = block_ranges(segment_ids, positions, block)
    args = _backend.kernel_operands(seg, pos, summary, q, k, v)
    whole = pl.no_block_spec
    return pl.pallas_call(
        functools.partial(_kernel, dims=dims, bq=block),
        out_shape=_backend.output_struct(q.shape, q.dtype, args[3]),
        grid=(summary.shape[0], dims.num_q_heads),
        in_specs=[whole] * 6,
        out_specs=whole,
        compiler_params=_backend.compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="prefill_attention",
    )(*args)
