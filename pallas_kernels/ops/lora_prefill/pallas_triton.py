"""Pallas (Triton lowering) MBGMM: multi-adapter LoRA over runs of tokens, straight from the page pool.

Tokens come in runs sharing a slot (the engine sorts by adapter); `tiles.segment_tiles` cuts them
into tiles of <= TM tokens of one slot, on device, into a static-size list.
  shrink  grid (NT,): tile i loads x[tile, BK-column block] once and, for every module m, the
          A^T rows of all rank blocks at once as a gather [RK, BK] through `a_pages` (rows past the
          module's rank masked: no bytes for them), accumulating v_m = x @ A_m with tl.dot into
          [TM, RK] f32; then v * scale goes to a [T, M, RK] f32 buffer.
  expand  grid (NT, NOB): (tile, BN-column block of y) loads v [TM, RK], the B rows [RK, BN]
          (gathered through `b_pages`, masked past the rank), and y [TM, BN]; y += v @ B with
          tl.dot (v rounded to the pool dtype, as S-LoRA does), y aliased input->output.
Bound: bytes. x is read once per tile for all modules (M-way fusion) and y read+written once;
adapter weights (r * (d_in*M + sum d_out) per slot) are re-read per tile, from L2. FLOPs per token
are 2 * RK * (M*d_in + sum d_out) against 2 * d_in + 4 * sum d_out bytes of x and y: for q/k/v at
H = 4096, RK = 64 that is ~70 FLOP/byte, below the ~200 FLOP/byte ridge of an H200, so computing
on the padded RK rather than each slot's own rank costs no time; only the loads skip.
Unsorted slots overflow the static tile list; the api then falls back to the XLA path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels._checks import as_index_vector, cdiv, matmul_precision, next_pow2, pow2_divisor
from pallas_kernels.ops.lora_decode.pallas_triton import output_blocks
from pallas_kernels.ops.lora_layout import LoraDims


def unsupported_reason(dims: LoraDims) -> str | None:
    R = dims.page_rows
    if R & (R - 1):
        return f"page_rows (pool.shape[2]) must be a power of two, got {R}"
    if pow2_divisor(dims.width, 16) < 16:
        return f"pool width W = {dims.width} must be a multiple of 16 (tl.dot needs blocks of >= 16)"
    return None


def _rank_rows(dims: LoraDims, rk: int):
    """For each of the rk padded rank rows: its rank block (clipped to the table) and row in the page.

    Weight tiles are gathered with integer-array indices on every axis (rows x columns), the form
    both the Triton lowering and interpret mode accept.
    """
    rr = jnp.arange(rk)
    return rr, jnp.minimum(rr // dims.page_rows, dims.rank_blocks - 1), rr % dims.page_rows


def _shrink_kernel(
    layer_ref, start_ref, end_ref, tslot_ref, ranks_ref, scales_ref, a_pages_ref, x_ref, pool_ref, v_ref,
    *, dims: LoraDims, tm: int, bk: int, rk: int,
):
    i = pl.program_id(0)
    R, W, M = dims.page_rows, dims.width, dims.num_modules
    layer, start, end, slot = layer_ref[0], start_ref[i], end_ref[i], tslot_ref[i]
    s = jnp.maximum(slot, 0)
    rank = [jnp.where(slot >= 0, jnp.clip(ranks_ref[s, layer, m], 0, dims.max_rank), 0) for m in range(M)]
    any_rank = functools.reduce(jnp.maximum, rank)

    @pl.when(any_rank > 0)
    def _():
        row_ok = (start + jnp.arange(tm)) < end
        rr, blk, within = _rank_rows(dims, rk)
        prec = matmul_precision(pool_ref.dtype)

        def body(kb, accs):
            k0 = kb * bk
            c = k0 // W
            col_ok = (k0 + jnp.arange(bk)) < dims.d_in
            xk = _backend.load(
                x_ref.at[pl.ds(start, tm), pl.ds(k0, bk)], mask=row_ok[:, None] & col_ok[None, :], other=0
            )
            out = []
            for m in range(M):
                pages = jnp.clip(a_pages_ref[s, m, c, blk], 0, dims.num_pages - 1)
                cols = k0 - c * W + jnp.arange(bk)
                w = _backend.load(
                    pool_ref.at[layer, (pages * R + within)[:, None], cols[None, :]],
                    mask=(rr < rank[m])[:, None] & col_ok[None, :], other=0,
                )
                out.append(accs[m] + lax.dot_general(
                    xk, w, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
                ))
            return tuple(out)

        zero = jnp.zeros((tm, rk), jnp.float32)
        accs = lax.fori_loop(0, cdiv(dims.d_in, bk), body, tuple(zero for _ in range(M)))
        for m in range(M):
            _backend.store(
                v_ref.at[pl.ds(start, tm), jnp.int32(m), :], accs[m] * scales_ref[s, layer, m].astype(jnp.float32),
                mask=row_ok[:, None],
            )


def _expand_kernel(
    layer_ref, start_ref, end_ref, tslot_ref, ranks_ref, b_pages_ref, blocks_ref, v_ref, pool_ref, y_ref, o_ref,
    *, dims: LoraDims, tm: int, bn: int, rk: int,
):
    i, b = pl.program_id(0), pl.program_id(1)
    R = dims.page_rows
    layer, start, end, slot = layer_ref[0], start_ref[i], end_ref[i], tslot_ref[i]
    m, c, col, y0, ncols = (blocks_ref[b, k] for k in range(5))
    s = jnp.maximum(slot, 0)
    rank = jnp.where(slot >= 0, jnp.clip(ranks_ref[s, layer, m], 0, dims.max_rank), 0)

    @pl.when(rank > 0)
    def _():
        row_ok = (start + jnp.arange(tm)) < end
        col_ok = jnp.arange(bn) < ncols
        rr, blk, within = _rank_rows(dims, rk)
        v = _backend.load(v_ref.at[pl.ds(start, tm), m, :], mask=row_ok[:, None], other=0)
        pages = jnp.clip(b_pages_ref[s, m, c, blk], 0, dims.num_pages - 1)
        w = _backend.load(
            pool_ref.at[layer, (pages * R + within)[:, None], (col + jnp.arange(bn))[None, :]],
            mask=(rr < rank)[:, None] & col_ok[None, :], other=0,
        )
        acc = lax.dot_general(
            v.astype(w.dtype), w, (((1,), (0,)), ((), ())),
            precision=matmul_precision(w.dtype), preferred_element_type=jnp.float32,
        )
        yx = y_ref.at[pl.ds(start, tm), pl.ds(y0, bn)]
        ok = row_ok[:, None] & col_ok[None, :]
        yv = _backend.load(yx, mask=ok, other=0)
        out = (yv.astype(jnp.float32) + acc).astype(o_ref.dtype)
        _backend.store(o_ref.at[pl.ds(start, tm), pl.ds(y0, bn)], out, mask=ok)


@functools.partial(
    jax.jit, static_argnames=("dims", "interpret", "num_tiles", "block_tokens", "block_k", "block_n", "num_warps")
)
def lora_prefill_pallas(
    y, x, pool, layer, a_pages, b_pages, ranks, scales, tiles, *,
    dims: LoraDims, interpret: bool, num_tiles: int, block_tokens: int = 64, block_k: int = 128,
    block_n: int = 128, num_warps: int = 4,
):
    """Shapes as `lora_prefill`; `tiles` = (start, end, slot) [num_tiles] from `tiles.segment_tiles`."""
    T, M, R, W = dims.num_tokens, dims.num_modules, dims.page_rows, dims.width
    tm = block_tokens
    bk = pow2_divisor(W, block_k)
    bn = pow2_divisor(W, block_n)
    rk = max(16, next_pow2(dims.max_rank))
    layer_v = jnp.clip(as_index_vector(layer), 0, dims.num_layers - 1)
    pool_rows = pool.reshape(dims.num_layers, dims.num_pages * R, W)  # free: rows of all pages
    start, end, tslot = tiles
    ranks = ranks.astype(jnp.int32)
    whole = pl.no_block_spec
    params = _backend.compiler_params(num_warps=num_warps, num_stages=2)

    shrink_args = _backend.kernel_operands(
        layer_v, start, end, tslot, ranks, scales.astype(jnp.float32), a_pages.astype(jnp.int32), x, pool_rows
    )
    v = pl.pallas_call(
        functools.partial(_shrink_kernel, dims=dims, tm=tm, bk=bk, rk=rk),
        out_shape=_backend.output_struct((T, M, rk), jnp.float32, shrink_args[0]),
        grid=(num_tiles,),
        in_specs=[whole] * 9,
        out_specs=whole,
        compiler_params=params,
        interpret=interpret,
        name="lora_prefill_shrink",
    )(*shrink_args)

    blocks = jnp.asarray(output_blocks(dims, bn))
    expand_args = _backend.kernel_operands(
        layer_v, start, end, tslot, ranks, b_pages.astype(jnp.int32), blocks, v, pool_rows, y
    )
    return pl.pallas_call(
        functools.partial(_expand_kernel, dims=dims, tm=tm, bn=bn, rk=rk),
        out_shape=_backend.output_struct(y.shape, y.dtype, expand_args[-1]),
        grid=(num_tiles, blocks.shape[0]),
        in_specs=[whole] * 10,
        out_specs=whole,
        input_output_aliases={9: 0},
        compiler_params=params,
        interpret=interpret,
        name="lora_prefill_expand",
    )(*expand_args)
