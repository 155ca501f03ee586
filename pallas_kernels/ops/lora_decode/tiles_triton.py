"""MBGMV over tiles of tokens that share an adapter (the "tiles" grouping), SGMV-style, in two launches.

A plan computed by XLA from the slot table (`tile_plan`, a stable sort of the slots and the segment tiles of
`lora_prefill.tiles`) lists tiles of at most TM tokens of one slot; a token alone on its adapter is a tile of
one. The plan depends on the slot table only and costs about as much as one call (a sort and a few scans, ~17 us
on the H200), so a step that runs the op for every layer and projection group computes it once and passes it in
(`lora_decode_tiles`'s ``plan``; the engine does).
  shrink  grid (KS * RB, M, NT): program (p, j, m, i) multiplies tile i's x rows [TM, BK] by rank block j of m's
          A^T [R, BK] (one page, rows past the rank masked: no bytes) with tl.dot over part p of d_in, and writes
          the partial v [TM, R] (float32, scaled) to a [T, M, KS, RB * R] buffer; blocks past the rank exit.
  expand  grid (BLOCKS, NT): program (b, i) adds up tile i's KS partials of module m per rank block, rounds them
          to the pool's dtype (as MBGMM and S-LoRA do) and adds v_j @ B_j[:, block b] to y's rows with tl.dot
          (blocks past the rank wholly masked); y is aliased input->output, so rows without an adapter are never
          touched.
The tile axis is the grid's last (slowest) one: the GPU starts blocks in grid order, so the busy tiles (the
plan puts them first) are dispatched before the empty tiles past the plan's count, which only read their
slot and exit.
Why tiles: tokens that share an adapter read each weight tile once per tile instead of once per token, and
the products run on tensor cores; a tile of one token costs the same bytes as the per-token kernels (masked
rows load nothing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels._checks import cdiv, matmul_precision, next_pow2, pow2_divisor
from pallas_kernels.ops.lora_layout import (LoraDims, for_live_rank_blocks, kernel_layer, kernel_slot,
                                            kernel_slot_rank, layer_operand, output_blocks)
from pallas_kernels.ops.lora_prefill import tiles as segment

# Tokens per tile: the smallest M that tl.dot takes.
TILE_TOKENS = 16
# Warps per program: a tile's products are [16, 16] x [16, BN] and [16, BK] x [BK, 16]. On the H200 (256 tokens
# on one adapter, results/kernels-tiles-h200-2026-12-01/kernel-profile-run3.json) 2 warps took 15.8 us, 4 warps
# 18.4 and 8 warps 26.9.
NUM_WARPS = 2
# Columns per shrink block (BK) and per expand block (BN). BN = 256 against 128 at 2 warps, side by side in four
# runs (results/kernels-tiles-h200-2026-12-01/kernel-profile-run4..run7.json): 15.3 / 15.6 / 14.6 / 14.7 and 14.9
# us against 15.8 / 15.6 / 15.1 / 15.3 and 15.2.
BLOCK_K = 256
BLOCK_N = 256
# Shrink programs to aim for when choosing the split of d_in: about one per SM of an H200's 132. With 256 tokens
# on one adapter (16 tiles, q/k/v) that is 4 parts of d_in: 15.8 us against 16.2 for 2 parts and 17.9 for 8
# (benchmarks/results/kernels-tiles-h200-2026-12-01/kernel-profile-run4.json); each part is a partial v the
# expand reads back.
TARGET_SHRINK_PROGRAMS = 128


def num_tiles(num_tokens: int, num_slots: int, tm: int = TILE_TOKENS, sort: bool = True) -> int:
    """Static length of the plan's tile list: sorted, the slots form at most S + 1 runs; as given, up to T."""
    return segment.max_tiles(num_tokens, num_slots, tm) if sort else num_tokens


def tile_plan(token_slot, num_slots: int, *, tm: int = TILE_TOKENS, sort: bool = True):
    """(rows [NT * tm], slot [NT]) int32: tile i holds the tokens rows[i*tm:(i+1)*tm] that are < T (T marks a
    row past the tile's end), all of slot slot_i (-1: no adapter, or an empty tile past the plan's count).
    The kernels read a tile's rows by its index alone, so its first loads do not wait on each other.
    ``sort=False`` takes the tokens as given (runs of consecutive tokens only), for callers that order tokens
    by adapter."""
    T, S = token_slot.shape[0], num_slots
    key = jnp.where((token_slot >= 0) & (token_slot < S), token_slot, S).astype(jnp.int32)
    order = jnp.arange(T, dtype=jnp.int32)
    if sort:
        key, order = lax.sort((key, order), num_keys=1, is_stable=True)
    start, end, slot, _ = segment.segment_tiles(jnp.where(key < S, key, -1), tm, num_tiles(T, S, tm, sort))
    pos = start[:, None] + jnp.arange(tm, dtype=jnp.int32)[None, :]
    rows = jnp.where(pos < end[:, None], order[jnp.minimum(pos, T - 1)], T)
    return rows.reshape(-1).astype(jnp.int32), slot


def default_splits(dims: LoraDims, bk: int, tm: int = TILE_TOKENS) -> int:
    """Parts of d_in per tile: enough shrink programs for the SMs when tiles are few (a shared adapter), a power
    of two dividing d_in's blocks so that every part is whole."""
    n_kb = cdiv(dims.d_in, bk)
    want = next_pow2(cdiv(TARGET_SHRINK_PROGRAMS, cdiv(dims.num_tokens, tm) * dims.num_modules))
    return pow2_divisor(n_kb, min(want, n_kb)) if n_kb & (n_kb - 1) else min(want, n_kb)


def _tile(refs, i, dims, tm):
    """Tile i: (rows [tm, 1] token ids, T past the tile's end; tok_ok [tm]; slot). A plan is the caller's input:
    rows outside [0, T) and slots outside [0, S) count as none, so no plan reads out of bounds."""
    rows_ref, tslot_ref = refs
    rows = rows_ref[pl.ds(i * tm, tm)]
    return rows[:, None], (rows >= 0) & (rows < dims.num_tokens), kernel_slot(tslot_ref[i], dims)


def _shrink_kernel(layer_ref, *refs, dims, tm, bk, ks, exact):
    *plan_refs, ranks_ref, scales_ref, a_pages_ref, x_ref, pool_ref, v_ref = refs
    q, m, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    p, j = q // dims.rank_blocks, q % dims.rank_blocks  # part of d_in, rank block
    R, W = dims.page_rows, dims.width
    layer = kernel_layer(layer_ref, dims)
    rows, tok_ok, slot = _tile(plan_refs, i, dims, tm)
    s, rank = kernel_slot_rank(slot, ranks_ref, layer, m, dims)
    nrows = jnp.clip(rank - j * R, 0, R)

    @pl.when(nrows > 0)
    def _():
        row_ok = (jnp.arange(R) < nrows)[:, None]
        ng = cdiv(cdiv(dims.d_in, bk), ks)
        prec = matmul_precision(pool_ref.dtype)

        def body(kb, acc):
            k0 = (p * ng + kb) * bk
            c = jnp.minimum(k0 // W, dims.in_chunks - 1)  # a block past d_in is wholly masked below
            col_ok = _backend.column_mask(k0, bk, dims.d_in, exact)
            xt = _backend.load(x_ref.at[rows, (k0 + jnp.arange(bk))[None, :]], mask=tok_ok[:, None] & col_ok[None, :],
                               other=0)
            page = jnp.clip(a_pages_ref[s, m, c, j], 0, dims.num_pages - 1)
            w = _backend.load(pool_ref.at[layer, page, :, pl.ds(k0 - c * W, bk)], mask=row_ok & col_ok[None, :],
                              other=0)
            return acc + lax.dot_general(xt, w, (((1,), (1,)), ((), ())), precision=prec,
                                         preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, ng, body, jnp.zeros((tm, R), jnp.float32))
        scale = scales_ref[s, layer, m].astype(jnp.float32)
        _backend.store(v_ref.at[rows, m, p, (j * R + jnp.arange(R))[None, :]], acc * scale, mask=tok_ok[:, None])


def _expand_kernel(layer_ref, *refs, dims, tm, bn, ks, exact):
    *plan_refs, ranks_ref, b_pages_ref, blocks_ref, v_ref, pool_ref, y_ref, o_ref = refs
    b, i = pl.program_id(0), pl.program_id(1)
    R = dims.page_rows
    layer = kernel_layer(layer_ref, dims)
    if exact:
        m, c, col, y0, ncols = (blocks_ref[b, q] for q in range(5))
    else:
        m, c, col, y0, ncols = _block(b, dims, bn)
    rows, tok_ok, slot = _tile(plan_refs, i, dims, tm)
    s, rank = kernel_slot_rank(slot, ranks_ref, layer, m, dims)

    def add_products(live: int):
        """y's rows += the tile's v @ B over the first `live` rank blocks (rows past the rank masked: no bytes)."""
        col_ok = _backend.column_mask(0, bn, ncols, exact)
        prec = matmul_precision(pool_ref.dtype)
        acc = jnp.zeros((tm, bn), jnp.float32)
        for jb in range(live):
            cols_r = (jb * R + jnp.arange(R))[None, :]
            v = _backend.load(v_ref.at[rows, m, jnp.int32(0), cols_r], mask=tok_ok[:, None], other=0)
            for part in range(1, ks):
                v = v + _backend.load(v_ref.at[rows, m, jnp.int32(part), cols_r], mask=tok_ok[:, None], other=0)
            page = jnp.clip(b_pages_ref[s, m, c, jb], 0, dims.num_pages - 1)
            row_ok = (jnp.arange(R) < rank - jb * R)[:, None]
            w = _backend.load(pool_ref.at[layer, page, :, pl.ds(col, bn)], mask=row_ok & col_ok[None, :], other=0)
            acc = acc + lax.dot_general(v.astype(w.dtype), w, (((1,), (0,)), ((), ())), precision=prec,
                                        preferred_element_type=jnp.float32)
        idx = (rows, (y0 + jnp.arange(bn))[None, :])
        ok = tok_ok[:, None] & col_ok[None, :]
        yv = _backend.load(y_ref.at[idx], mask=ok, other=0)
        _backend.store(o_ref.at[idx], (yv.astype(jnp.float32) + acc).astype(o_ref.dtype), mask=ok)

    # As the per-token expand: a block past the rank would still issue its loads' addressing and a tl.dot on zeros.
    for_live_rank_blocks(rank, dims, add_products)


def _block(b, dims: LoraDims, bn: int):
    """Block b of y's columns, by arithmetic, when every module's width is a multiple of bn (blocks are then
    y[:, b*bn:(b+1)*bn]): (module, page chunk, column in the chunk, y column, bn). Unlike a table entry, the
    columns come with their divisibility, so Triton vectorises the loads and stores of B and y."""
    y0 = pl.multiple_of(b * bn, bn)
    m = functools.reduce(lambda a, off: a + (y0 >= off).astype(jnp.int32), dims.offsets[1:], jnp.int32(0))
    off = functools.reduce(lambda a, o: jnp.where(y0 >= o, o, a), dims.offsets[1:], jnp.int32(dims.offsets[0]))
    q = y0 - off
    c = q // dims.width
    return m, c, pl.multiple_of(q - c * dims.width, bn), y0, bn


def unsupported_reason(dims: LoraDims, block_k: int | None = None, block_n: int | None = None) -> str | None:
    """Why the tile kernels (tl.dot over >= 16 on every side) cannot take these sizes with these blocks (None: the
    defaults; capped, as the kernels cap them, to what divides W), or None."""
    bk = pow2_divisor(dims.width, block_k or BLOCK_K)
    bn = pow2_divisor(dims.width, block_n or BLOCK_N)
    if dims.page_rows < 16:
        return f"page_rows {dims.page_rows} < 16"
    if min(bk, bn) < 16:
        return f"pool width {dims.width} has no power-of-two block >= 16"
    return None


@functools.partial(jax.jit, static_argnames=("dims", "interpret", "tm", "block_k", "block_n", "k_splits",
                                             "num_warps", "sort"))
def lora_decode_tiles(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, plan=None, *, dims: LoraDims,
                      interpret: bool, tm: int = TILE_TOKENS, block_k: int = BLOCK_K, block_n: int = BLOCK_N,
                      k_splits: int | None = None, num_warps: int = NUM_WARPS, sort: bool = True):
    """Shapes as `lora_decode`; token_slot as given (the plan makes ids outside [0, S) no adapter). plan:
    `tile_plan`'s result for these slots, or None to compute it here."""
    if plan is None:
        plan = tile_plan(token_slot, dims.num_slots, tm=tm, sort=sort)
    bk = pow2_divisor(dims.width, block_k)
    bn = pow2_divisor(dims.width, block_n)
    ks = k_splits or default_splits(dims, bk, tm)
    if ks < 1 or ks & (ks - 1):
        raise ValueError(f"k_splits must be a power of two, got {ks}")
    v = shrink_pallas(x, pool, layer, a_pages, ranks, scales, plan, dims=dims, interpret=interpret, tm=tm, bk=bk,
                      ks=ks, num_warps=num_warps)
    return expand_pallas(y, v, pool, layer, b_pages, ranks, plan, dims=dims, interpret=interpret, tm=tm, bn=bn, ks=ks,
                         num_warps=num_warps)


def shrink_pallas(x, pool, layer, a_pages, ranks, scales, plan, *, dims, interpret, tm, bk, ks, num_warps=4):
    """The first kernel alone: v [T, M, ks, RB * R] float32 partial sums, scaled (rows of tiles with rank 0 and rank
    blocks past a tile's rank unwritten). Public so that a benchmark can time the two kernels apart."""
    args = _backend.kernel_operands(layer_operand(layer), *plan, ranks.astype(jnp.int32), scales.astype(jnp.float32),
                                    a_pages.astype(jnp.int32), x, pool)
    return pl.pallas_call(
        functools.partial(_shrink_kernel, dims=dims, tm=tm, bk=bk, ks=ks, exact=dims.d_in % bk != 0),
        out_shape=_backend.output_struct((dims.num_tokens, dims.num_modules, ks, dims.rank_blocks * dims.page_rows),
                                         jnp.float32, args[0]),
        grid=(ks * dims.rank_blocks, dims.num_modules, plan[1].shape[0]),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.no_block_spec,
        compiler_params=_backend.compiler_params(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="lora_decode_tiles_shrink",
    )(*args)


def expand_pallas(y, v, pool, layer, b_pages, ranks, plan, *, dims, interpret, tm, bn, ks, num_warps=4):
    """The second kernel alone: y + v B, y aliased to the output."""
    blocks = jnp.asarray(output_blocks(dims, bn))
    return _backend.update_in_place(
        functools.partial(_expand_kernel, dims=dims, tm=tm, bn=bn, ks=ks, exact=any(d % bn for d in dims.out_sizes)),
        layer_operand(layer), *plan, ranks.astype(jnp.int32), b_pages.astype(jnp.int32), blocks, v, pool, y,
        grid=(blocks.shape[0], plan[1].shape[0]), num_warps=num_warps, interpret=interpret,
        name="lora_decode_tiles_expand",
    )
