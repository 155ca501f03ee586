"""Pallas (Triton lowering) MBGMV: multi-adapter LoRA for decode, straight from the page pool.

The default path is the per-token pair of kernels described next (`grouping="none"`, DEFAULT_GROUPING), with
knobs chosen by batch size (`per_token_knobs`). The grouped pair ("Grouped MBGMV" below) puts tokens that share
an adapter in tiles of up to 16 that read its A and B once and multiply them in with tl.dot; measured slower
where adapters differ, it stays as a choice.

The per-token kernels, as S-LoRA/Punica do it:
  shrink  grid (T, M, RB): program (t, m, j) computes v[t, m, j*R:(j+1)*R] = scale * x[t] @ A_m
          for one rank block of token t's adapter, streaming the block's A^T tiles [R, BK] from
          the pool through `a_pages`; blocks past the token's rank run zero iterations, and rows
          past the rank inside the last block are masked out of the load (no bytes for them).
  expand  grid (T, chunks): program (t, c) adds v[t, m] @ B_m to one W-column page chunk of module m's
          part of y, as a loop over the chunk's BN-column blocks (the pages and v looked up once per
          chunk), B tiles read through `b_pages`, y aliased input->output so rows without an adapter are
          never touched. (``expand_per_chunk=False``: one program per (token, BN block) instead.)
Bound: bytes. Per token, rank r: r*(d_in*M + sum d_out) weight elements (distinct adapters are
read from HBM once, shared ones hit L2), plus x once per rank block and y read+write once; FLOPs
are 2 per weight element, far below the tensor-core rate, so the products use CUDA cores
(elementwise multiply + reduce: one row per token leaves no M >= 16 for tl.dot).
Design: a program per rank block gives T*M*RB-way parallelism even for one token (T = 1 still
fills a dozen SMs); v goes through a [T, M, RB, KS, R] f32 buffer (tiny) between the two launches, KS =
``k_splits`` programs each covering 1/KS of d_in for one rank block (partial sums the expand adds up).
Column masks are one predicate per block wherever sizes are multiples of the blocks
(`_backend.column_mask`): per-column masks against a table entry kept Triton from vectorising.
Measured on the H200 (benchmarks/NOTES.md, 2026-11-28), T = 256 tokens on 256 rank-16 adapters, q/k/v:
these defaults (BK = BN = 256, expand per chunk) run at 75-78% of jax's `x + 1` bandwidth (3.3 TB/s; 62-63% of the
4.08-4.13 TB/s copy measured since, 2026-11-30/12-01), against 60% of the former for one
expand program per 512-column block with BK = 512 in the same runs.

Fused variant (``fused=True``; one launch, grid (T, M)): program (t, m) gathers all of its adapter's rank
rows at once (one [max_rank, BK] tile per step, the page of each row looked up through the table; rows past
the rank are masked, so they cost no bytes), keeps v in registers and expands it over m's output columns.
Measured on the H200 (benchmarks/results/kernels-lora_decode-fused-2026-11-28.json) it is 1.7-2.4x slower
than the split kernels on every shape, tuned or not: only T*M programs, each a long serial loop, and
compute on the masked rows of the max_rank-row tile. So it is not the default; it stays for comparison.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels._checks import cdiv, matmul_precision, next_pow2, pow2_divisor
from pallas_kernels.ops.lora_decode import tiles_triton
from pallas_kernels.ops.lora_layout import (LoraDims, for_live_rank_blocks, kernel_layer, kernel_slot,
                                            kernel_slot_rank, layer_operand, output_blocks, output_chunks,
                                            sanitize_slots)


# Default columns per shrink tile (BK) and per expand block (BN), capped to what divides W. On the H200,
# 256 / 256 with the per-chunk expand ran the 256-adapter target case at 75-78% of jax's `x + 1` bandwidth (62-63% of
# the better copy measured since)
# (benchmarks/NOTES.md, "MBGMV: the expand was the slow half").
BLOCK_K = 256
BLOCK_N = 256
# Batches of at most this many tokens (the engine's smallest decode bucket) get the per-token kernels' small-batch
# knobs: the shrink's pass over d_in split over several programs (`default_single_splits`), and one expand program
# per SMALL_BLOCK_N-column block instead of per page chunk. At T = 256 the shrink is many short loops already
# and one program per chunk wins; at T = 1..8 the op is two chains of dependent loads on a dozen programs. On the
# H200 (2026-12-01, kernels-smallT-defaults-2026-12-01.json) this took q/k/v at T = 1 / 2 / 4 / 8 / 16 from
# 15.4-16.4 us to 8.5 / 8.6 / 8.7 / 9.2 / 11.7 us; at T = 256 the same knobs were 1.6x slower (99.2 against 62.0 us,
# kernels-smallT-2026-12-01.json). Batches of 17-255 tokens were not timed with them.
SMALL_BATCH_TOKENS = 16
SMALL_BLOCK_N = 128
# The per-chunk expand multiplies only each token's live rank blocks (`_expand_chunk_kernel`). On the H200
# (2026-12-01, results/kernels-tiles-h200-2026-12-01/kernel-profile-run5.json), 256 tokens on 256 rank-16 adapters
# in a pool of rank 64: expand 21.0 against 26.4 us, the op 55.4 / 55.9 against 59.9 / 60.0 us (two repeats in one
# run). Read when a kernel is traced (a benchmark sets it False to time the former kernel).
LIVE_RANK_BLOCKS = True


def unsupported_reason(dims: LoraDims) -> str | None:
    """Why the Triton kernel cannot take these sizes, or None."""
    R = dims.page_rows
    if R & (R - 1):
        return f"page_rows (pool.shape[2]) must be a power of two, got {R}"
    return None


def _shrink_kernel(layer_ref, slot_ref, ranks_ref, scales_ref, a_pages_ref, x_ref, pool_ref, v_ref, *, dims, bk, ks,
                   exact):
    t, m = pl.program_id(0), pl.program_id(1)
    # Rank block, and which 1/ks of d_in.
    j, part = (pl.program_id(2), 0) if ks == 1 else (pl.program_id(2) // ks, pl.program_id(2) % ks)
    n_kb = cdiv(cdiv(dims.d_in, bk), ks)
    R, W = dims.page_rows, dims.width
    layer, slot = _layer_slot(layer_ref, slot_ref, t, dims)
    s, rank = kernel_slot_rank(slot, ranks_ref, layer, m, dims)
    nrows = jnp.clip(rank - j * R, 0, R)
    row_ok = (jnp.arange(R) < nrows)[:, None]

    def body(i, acc):
        k0 = (part * n_kb + i) * bk
        c = k0 // W if ks == 1 else jnp.minimum(k0 // W, dims.in_chunks - 1)  # past d_in: masked below
        page = jnp.clip(a_pages_ref[s, m, c, j], 0, dims.num_pages - 1)
        col_ok = _backend.column_mask(k0, bk, dims.d_in, exact)
        tile = _backend.load(
            pool_ref.at[layer, page, :, pl.ds(k0 - c * W, bk)], mask=row_ok & col_ok[None, :], other=0
        )
        xk = _backend.load(x_ref.at[t, pl.ds(k0, bk)], mask=col_ok, other=0)
        return acc + tile.astype(jnp.float32) * xk.astype(jnp.float32)[None, :]

    # Static trip count under pl.when: on jax 0.11.2 the Triton lowering of a fori_loop with a traced
    # bound emits an scf.for with mixed i32/i64 bounds that fails to verify. Rank blocks past the
    # adapter's rank skip the loop entirely.
    @pl.when(nrows > 0)
    def _():
        acc = lax.fori_loop(0, n_kb, body, jnp.zeros((R, bk), jnp.float32))
        v_ref[...] = jnp.sum(acc, axis=1) * scales_ref[s, layer, m].astype(jnp.float32)

    @pl.when(nrows <= 0)
    def _():
        v_ref[...] = jnp.zeros((R,), jnp.float32)


def _expand_kernel(layer_ref, slot_ref, ranks_ref, b_pages_ref, blocks_ref, v_ref, pool_ref, y_ref, o_ref, *, dims, bn,
                   ks, exact):
    t, b = pl.program_id(0), pl.program_id(1)
    R = dims.page_rows
    m, c, col, y0, ncols = (blocks_ref[b, i] for i in range(5))
    layer, slot = _layer_slot(layer_ref, slot_ref, t, dims)
    s, rank = kernel_slot_rank(slot, ranks_ref, layer, m, dims)
    nb = (rank + R - 1) // R

    @pl.when(nb > 0)
    def _():
        col_ok = _backend.column_mask(0, bn, ncols, exact)

        def body(jb, acc):
            page = jnp.clip(b_pages_ref[s, m, c, jb], 0, dims.num_pages - 1)
            # Blocks past the rank are fully masked: a masked load reads no memory.
            row_ok = jnp.arange(R) < rank - jb * R
            tile = _backend.load(
                pool_ref.at[layer, page, :, pl.ds(col, bn)], mask=row_ok[:, None] & col_ok[None, :], other=0
            )
            return acc + jnp.sum(_v_block(v_ref, t, m, jb, ks)[:, None] * tile.astype(jnp.float32), axis=0)

        acc = lax.fori_loop(0, dims.rank_blocks, body, jnp.zeros((bn,), jnp.float32))
        yv = _backend.load(y_ref.at[t, pl.ds(y0, bn)], mask=col_ok, other=0)
        _backend.store(o_ref.at[t, pl.ds(y0, bn)], (yv.astype(jnp.float32) + acc).astype(o_ref.dtype), mask=col_ok)


def _expand_chunk_kernel(layer_ref, slot_ref, ranks_ref, b_pages_ref, chunks_ref, v_ref, pool_ref, y_ref, o_ref, *,
                         dims, bn, ks, exact, live_blocks=True):
    """Program (t, chunk): one W-column page chunk of one module, as a loop over its BN-column blocks. The
    pages and v are looked up once per chunk; the loop's loads do not depend on earlier iterations, so the
    compiler's pipeline has the next block's tiles in flight while this one is summed and stored.
    live_blocks: one branch per count of live rank blocks, each unrolling only those (a rank-16 adapter in a
    pool of rank 64 multiplies one [R, bn] tile per column block, not four of which three are masked: the
    masked loads cost no bytes, but their multiply-adds still issue, and the expand was issue-bound, 67% of
    cycles, in Nsight Compute on the H200); False: one branch over every block, masked past the rank."""
    t, b = pl.program_id(0), pl.program_id(1)
    R = dims.page_rows
    m, c, y0, ncols = (chunks_ref[b, i] for i in range(4))
    layer, slot = _layer_slot(layer_ref, slot_ref, t, dims)
    s, rank = kernel_slot_rank(slot, ranks_ref, layer, m, dims)

    def chunk(nblocks):
        blocks = range(nblocks)  # unrolled; rows past the rank are masked (no bytes)
        pages = [jnp.clip(b_pages_ref[s, m, c, jb], 0, dims.num_pages - 1) for jb in blocks]
        row_ok = [(jnp.arange(R) < rank - jb * R)[:, None] for jb in blocks]
        vs = [_v_block(v_ref, t, m, jb, ks)[:, None] for jb in blocks]

        def body(i, carry):
            q0 = i * bn
            col_ok = _backend.column_mask(q0, bn, ncols, exact)
            acc = jnp.zeros((R, bn), jnp.float32)
            for jb in blocks:
                tile = _backend.load(pool_ref.at[layer, pages[jb], :, pl.ds(q0, bn)], mask=row_ok[jb] & col_ok[None, :],
                                     other=0)
                acc = acc + vs[jb] * tile.astype(jnp.float32)
            yv = _backend.load(y_ref.at[t, pl.ds(y0 + q0, bn)], mask=col_ok, other=0)
            out = yv.astype(jnp.float32) + jnp.sum(acc, axis=0)
            _backend.store(o_ref.at[t, pl.ds(y0 + q0, bn)], out.astype(o_ref.dtype), mask=col_ok)
            return carry

        lax.fori_loop(0, dims.width // bn, body, 0)

    if not live_blocks:
        pl.when(rank > 0)(lambda: chunk(dims.rank_blocks))
        return
    for_live_rank_blocks(rank, dims, chunk)


def _layer_slot(layer_ref, slot_ref, t, dims):
    """The layer and token t's slot, checked in the kernel (`kernel_layer`, `kernel_slot`)."""
    return kernel_layer(layer_ref, dims), kernel_slot(slot_ref[t], dims)


def _v_block(v_ref, t, m, jb, ks):
    """v of one rank block: the shrink's partial sums over d_in added up (one of them when ks = 1)."""
    return v_ref[t, m, jb, :] if ks == 1 else jnp.sum(v_ref[t, m, jb, :, :], axis=0)


def _fused_kernel(layer_ref, slot_ref, ranks_ref, scales_ref, a_pages_ref, b_pages_ref, mods_ref, x_ref, pool_ref,
                  y_ref, o_ref, *, dims, bk, bn, nblk):
    t, m = pl.program_id(0), pl.program_id(1)
    R, W = dims.page_rows, dims.width
    RR = next_pow2(dims.max_rank)  # Triton tiles are powers of two; rows past the rank are masked anyway
    layer, slot = _layer_slot(layer_ref, slot_ref, t, dims)
    s, rank = kernel_slot_rank(slot, ranks_ref, layer, m, dims)
    r = jnp.arange(RR)
    row_ok = (r < rank)[:, None]
    # Each rank row's block (page table column) and its row inside that page.
    blk, in_blk = jnp.minimum(r // R, dims.rank_blocks - 1), r % R

    def rows(pages_ref, c):
        return (jnp.clip(pages_ref[s, m, c, blk], 0, dims.num_pages - 1) * R + in_blk)[:, None]

    @pl.when(rank > 0)
    def _():
        def shrink(kb, acc):
            k0 = kb * bk
            c = k0 // W
            cols = k0 - c * W + jnp.arange(bk)
            col_ok = (k0 + jnp.arange(bk)) < dims.d_in
            tile = _backend.load(pool_ref.at[layer, rows(a_pages_ref, c), cols[None, :]],
                                 mask=row_ok & col_ok[None, :], other=0)
            xk = _backend.load(x_ref.at[t, pl.ds(k0, bk)], mask=col_ok, other=0)
            return acc + jnp.sum(tile.astype(jnp.float32) * xk.astype(jnp.float32)[None, :], axis=1)

        v = lax.fori_loop(0, cdiv(dims.d_in, bk), shrink, jnp.zeros((RR,), jnp.float32))
        v = v * scales_ref[s, layer, m].astype(jnp.float32)
        y0, d_out = mods_ref[m, 0], mods_ref[m, 1]

        # Static trip count (the widest module's blocks); blocks past this module's width are fully
        # masked: no loads, no stores.
        def expand(b, carry):
            q0 = b * bn
            c = jnp.minimum(q0 // W, dims.out_chunks_max - 1)
            col_ok = (q0 + jnp.arange(bn)) < d_out
            cols = q0 - c * W + jnp.arange(bn)
            tile = _backend.load(pool_ref.at[layer, rows(b_pages_ref, c), cols[None, :]],
                                 mask=row_ok & col_ok[None, :], other=0)
            delta = jnp.sum(v[:, None] * tile.astype(jnp.float32), axis=0)
            yv = _backend.load(y_ref.at[t, pl.ds(y0 + q0, bn)], mask=col_ok, other=0)
            _backend.store(o_ref.at[t, pl.ds(y0 + q0, bn)], (yv.astype(jnp.float32) + delta).astype(o_ref.dtype),
                           mask=col_ok)
            return carry

        lax.fori_loop(0, nblk, expand, 0)



# ------------------------------------------------------------------------------------------------
# Grouped MBGMV: tokens that share an adapter read its weights once per tile.
#
# A tile is up to GROUP_TOKENS tokens of one slot. The grids stay the per-token ones (one program per token and
# module / page chunk), and a tile of n >= 2 tokens spreads its work over its n programs: in the shrink,
# GROUP_SPLITS parts of d_in (program k of the tile does parts k, k + n, ...), in the expand, the page chunk's
# column blocks (block k, k + n, ...). So one adapter serving the whole batch keeps as many programs busy as
# distinct adapters do, and with distinct adapters the grids are the per-token kernels' own. v is indexed by
# token, as in the per-token kernels.
#
# Where the tiles come from (`grouping`):
#   "kernel"  every program derives its tile from the slot table itself: the k-th group of 16 among the tokens
#             of its slot, in token order (a compare, a prefix count and a [16, T] select over the table, which
#             sits in L2). No work outside the two kernels.
#   "sort"    the same tiles from a plan computed first by XLA (a stable sort of the slots and a few scans):
#             program i is the token at position i of the sorted order.
#   "runs"    the plan without the sort: tiles are runs of consecutive tokens with one slot.
#   "none"    the per-token kernels above, for every token.

# Tokens per group tile: the smallest M that tl.dot takes.
GROUP_TOKENS = 16
# Parts of d_in per group tile: each writes a partial v that the expand adds up. 8 parts of a 4096-wide input
# are 2 blocks of 256 columns per program.
GROUP_SPLITS = 8
# The per-token kernels: on the H200 (2026-11-30, kernels-v2-quick-2026-11-30.json) the grouped "kernel"
# grouping took 102.7 us where they take 63.3 (256 tokens on 256 adapters, the many-adapter case the engine
# serves most) and 32.0 against 43.5 with one shared adapter. The groupings stay as knobs.
DEFAULT_GROUPING = "none"
# "tiles": the segment-tile kernels of `tiles_triton` (a sorted plan, tiles in their own grid axis).
GROUPINGS = ("kernel", "sort", "runs", "tiles", "none")
# Above this many tokens "kernel" becomes "sort": every program of "kernel" loads the whole slot table and
# selects over [16, T] of it, which grows with T, while the sort is paid once.
KERNEL_PLAN_MAX_TOKENS = 1024


def grouped_unsupported_reason(dims: LoraDims, bk: int, bn: int) -> str | None:
    """Why the grouped kernels (tl.dot over >= 16 on every side) cannot take these sizes, or None; the op then
    keeps the per-token kernels, which take them."""
    if dims.page_rows < 16:
        return f"page_rows {dims.page_rows} < 16"
    if min(bk, bn) < 16:
        return f"pool width {dims.width} has no power-of-two block >= 16"
    return None


def default_single_splits(dims: LoraDims, bk: int) -> int:
    """Programs per rank block for a token alone on its adapter: 1 for big batches (measured best at T = 256);
    more at small T, where T * M programs of one serial pass over d_in leave most SMs idle and the op is one
    long chain of dependent loads (T = 1: 12 programs of 16 loads each on q/k/v at H = 4096)."""
    want = cdiv(128, dims.num_tokens * dims.num_modules)
    return int(max(1, min(8, next_pow2(want), next_pow2(cdiv(dims.d_in, bk)))))


def decode_plan(token_slot, dims: LoraDims, *, tm: int, sort: bool):
    """Group tiles of the "sort" / "runs" groupings, computed by XLA from the slot table.

    Positions i = 0..T-1 index the tokens in grouping order: order[i] is the token at position i and key[i]
    its slot (S for "no adapter", so such tokens sort last and form tiles of rank 0). A tile starts where the
    key changes or at a multiple of tm, and runs to the next start: it holds <= tm tokens of one slot.
    Returns int32 arrays (order [T + tm], padded with T; key [T]; start [T]: the first position of position
    i's tile; tile_len [T]: the size of position i's tile). Each is indexed by the program's own position, so
    a kernel's first table loads do not wait on each other.
    """
    T, S = dims.num_tokens, dims.num_slots
    pos = jnp.arange(T, dtype=jnp.int32)
    key = jnp.where(token_slot >= 0, token_slot, S).astype(jnp.int32)
    order = pos
    if sort:
        key, order = lax.sort((key, pos), num_keys=1, is_stable=True)
    prev = jnp.concatenate([jnp.full((1,), -1, jnp.int32), key[:-1]])
    is_start = (pos % tm == 0) | (key != prev)
    first_start_from = lax.cummin(jnp.where(is_start, pos, T), reverse=True)
    next_start = jnp.concatenate([first_start_from[1:], jnp.full((1,), T, jnp.int32)])
    start = lax.cummax(jnp.where(is_start, pos, 0))
    tile_len = (next_start - pos)[start].astype(jnp.int32)
    return jnp.concatenate([order, jnp.full((tm,), T, jnp.int32)]), key, start, tile_len


def kernel_plan_keys(token_slot, dims: LoraDims):
    """The one table of the "kernel" grouping: each token's key (slot, or S for none), padded with -1 (no
    token) to a power of two so that a program loads it whole as one Triton block."""
    T, S = dims.num_tokens, dims.num_slots
    key = jnp.where(token_slot >= 0, token_slot, S).astype(jnp.int32)
    return jnp.concatenate([key, jnp.full((next_pow2(T) - T,), -1, jnp.int32)])


def _tile(plan_refs, i, *, dims, tm, in_kernel):
    """The program at grid index i: (t: its own token, n: its tile's size, k: its index in the tile, key,
    members(): the tile's tokens [tm], T past n). Rows named T lie past the end: masked loads and stores never
    touch them on the GPU, and in interpret mode a gather there clamps and a scatter there is dropped."""
    T = dims.num_tokens
    if in_kernel:
        (keys_ref,) = plan_refs
        key = keys_ref[i]
        idx = jnp.arange(keys_ref.shape[0], dtype=jnp.int32)
        eq = (keys_ref[...] == key).astype(jnp.int32)
        rank_in_key = jnp.sum(jnp.where(idx < i, eq, 0))
        first = rank_in_key // tm * tm  # rank of the tile's first token among the key's tokens
        n = jnp.minimum(tm, jnp.sum(eq) - first)

        def members():
            before = jnp.cumsum(eq) - eq  # tokens of the key before each token
            sel = (eq[None, :] > 0) & (before[None, :] == (first + jnp.arange(tm, dtype=jnp.int32))[:, None])
            tok = jnp.sum(jnp.where(sel, idx[None, :], 0), axis=1)
            return jnp.where(jnp.arange(tm) < n, tok, T)

        return i, n, rank_in_key - first, key, members
    order_ref, key_ref, start_ref, len_ref = plan_refs
    st, n, key = start_ref[i], len_ref[i], key_ref[i]

    def members():
        return jnp.where(jnp.arange(tm) < n, order_ref[pl.ds(st, tm)], T)

    return order_ref[i], n, i - st, key, members


def _slot_rank(key, ranks_ref, layer, m, dims):
    """Slot (clipped for table reads) and module m's rank of a tile's key (S or -1: no adapter)."""
    return kernel_slot_rank(kernel_slot(key, dims), ranks_ref, layer, m, dims)


def _spread(k, n, units: int, fn):
    """Run fn(u) for the units u = k, k + n, k + 2n, ... < units: worker k of n >= 2 workers takes its share
    of `units` pieces of work. Static unrolling under pl.when: Triton loops need static bounds here (see
    `_shrink_kernel`)."""
    for r in range(cdiv(units, 2)):
        u = k + r * n

        @pl.when(u < units)
        def _():
            fn(u)


def _grouped_shrink_kernel(layer_ref, *refs, dims, bk, tm, gks, sks, exact, in_kernel):
    """Program (token, module m, rank block j x part p < sks). In a tile of >= 2 tokens, each [R, bk] tile of
    A is read once for all of them and multiplied into their x rows with tl.dot; the tile's gks parts of d_in
    are spread over its n * sks programs. A lone token runs the per-token loop over part p of sks. Rank blocks
    past the adapter's rank do nothing."""
    *plan_refs, ranks_ref, scales_ref, a_pages_ref, x_ref, pool_ref, v_ref = refs
    i, m, q = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    j, p = q // sks, q % sks
    R, W = dims.page_rows, dims.width
    layer = kernel_layer(layer_ref, dims)
    t, n, k, key, members = _tile(plan_refs, i, dims=dims, tm=tm, in_kernel=in_kernel)
    s, rank = _slot_rank(key, ranks_ref, layer, m, dims)
    nrows = jnp.clip(rank - j * R, 0, R)
    row_ok = (jnp.arange(R) < nrows)[:, None]
    n_kb = cdiv(dims.d_in, bk)
    cols_r = jnp.arange(R)[None, :]

    def a_tile(k0):
        c = jnp.minimum(k0 // W, dims.in_chunks - 1)  # a part past d_in: wholly masked below
        page = jnp.clip(a_pages_ref[s, m, c, j], 0, dims.num_pages - 1)
        col_ok = _backend.column_mask(k0, bk, dims.d_in, exact)
        tile = _backend.load(pool_ref.at[layer, page, :, pl.ds(k0 - c * W, bk)], mask=row_ok & col_ok[None, :],
                             other=0)
        return tile, col_ok

    @pl.when((n >= 2) & (nrows > 0))
    def _():
        ng = cdiv(n_kb, gks)
        tok_ok = jnp.arange(tm) < n
        rows = members()[:, None]
        prec = matmul_precision(pool_ref.dtype)
        scale = scales_ref[s, layer, m].astype(jnp.float32)

        def part(u):
            def body(kb, acc):
                k0 = (u * ng + kb) * bk
                a, col_ok = a_tile(k0)
                xt = _backend.load(x_ref.at[rows, (k0 + jnp.arange(bk))[None, :]],
                                   mask=tok_ok[:, None] & col_ok[None, :], other=0)
                return acc + lax.dot_general(xt, a, (((1,), (1,)), ((), ())), precision=prec,
                                             preferred_element_type=jnp.float32)

            acc = lax.fori_loop(0, ng, body, jnp.zeros((tm, R), jnp.float32))
            _backend.store(v_ref.at[rows, m, j, u, cols_r], acc * scale, mask=tok_ok[:, None])

        # The tile's n * sks programs of this rank block share its parts (sks > 1 only for small batches, where
        # a tile of 2-8 tokens would otherwise give each of its few programs several parts in a row).
        _spread(p * n + k, n * sks, gks, part)

    @pl.when((n == 1) & (nrows > 0) & (p < sks))
    def _():
        ns = cdiv(n_kb, sks)

        def body(kb, acc):
            k0 = (p * ns + kb) * bk
            a, col_ok = a_tile(k0)
            xk = _backend.load(x_ref.at[t, pl.ds(k0, bk)], mask=col_ok, other=0)
            return acc + a.astype(jnp.float32) * xk.astype(jnp.float32)[None, :]

        acc = lax.fori_loop(0, ns, body, jnp.zeros((R, bk), jnp.float32))
        v_ref[t, m, j, p, :] = jnp.sum(acc, axis=1) * scales_ref[s, layer, m].astype(jnp.float32)


def _grouped_expand_kernel(layer_ref, *refs, dims, bn, tm, gks, sks, exact, in_kernel):
    """Program (token, page chunk of one module). In a tile of >= 2 tokens, the chunk's bn-column blocks are
    spread over the tile's programs; per block each [R, bn] tile of B is read once and y[rows] += v @ B with
    tl.dot. A lone token runs the per-token expand over the chunk. v of rank blocks past the rank is never
    written by the shrink, so its loads are masked off (no bytes, and no stale values)."""
    *plan_refs, ranks_ref, b_pages_ref, chunks_ref, v_ref, pool_ref, y_ref, o_ref = refs
    i, b = pl.program_id(0), pl.program_id(1)
    R = dims.page_rows
    layer = kernel_layer(layer_ref, dims)
    m, c, y0, ncols = (chunks_ref[b, q] for q in range(4))
    t, n, k, key, members = _tile(plan_refs, i, dims=dims, tm=tm, in_kernel=in_kernel)
    s, rank = _slot_rank(key, ranks_ref, layer, m, dims)
    nb = (rank + R - 1) // R
    blocks = range(dims.rank_blocks)  # unrolled; blocks past the rank are fully masked (no bytes)
    n_cols = dims.width // bn

    def b_tiles(q0, col_ok):
        out = []
        for jb in blocks:
            page = jnp.clip(b_pages_ref[s, m, c, jb], 0, dims.num_pages - 1)
            row_ok = (jnp.arange(R) < rank - jb * R)[:, None]
            out.append(_backend.load(pool_ref.at[layer, page, :, pl.ds(q0, bn)], mask=row_ok & col_ok[None, :],
                                     other=0))
        return out

    @pl.when((n >= 2) & (rank > 0) & (k < n_cols))
    def _():
        tok_ok = jnp.arange(tm) < n
        rows = members()[:, None]
        prec = matmul_precision(pool_ref.dtype)
        cols_r = jnp.arange(R)[None, :]
        vs = []
        for jb in blocks:
            ok = jnp.broadcast_to(tok_ok[:, None] & (jb < nb), (tm, R))
            v = _backend.load(v_ref.at[rows, m, jnp.int32(jb), jnp.int32(0), cols_r], mask=ok, other=0)
            for part in range(1, gks):
                v = v + _backend.load(v_ref.at[rows, m, jnp.int32(jb), jnp.int32(part), cols_r], mask=ok, other=0)
            vs.append(v.astype(pool_ref.dtype))

        def column_block(u):
            q0 = u * bn
            col_ok = _backend.column_mask(q0, bn, ncols, exact)
            acc = jnp.zeros((tm, bn), jnp.float32)
            for v, w in zip(vs, b_tiles(q0, col_ok)):
                acc = acc + lax.dot_general(v, w, (((1,), (0,)), ((), ())), precision=prec,
                                            preferred_element_type=jnp.float32)
            idx = (rows, (y0 + q0 + jnp.arange(bn))[None, :])
            ok = tok_ok[:, None] & col_ok[None, :]
            yv = _backend.load(y_ref.at[idx], mask=ok, other=0)
            _backend.store(o_ref.at[idx], (yv.astype(jnp.float32) + acc).astype(o_ref.dtype), mask=ok)

        _spread(k, n, n_cols, column_block)

    @pl.when((n == 1) & (rank > 0))
    def _():
        vs = []
        for jb in blocks:
            ok = jnp.broadcast_to(jb < nb, (R,))
            v = _backend.load(v_ref.at[t, m, jnp.int32(jb), jnp.int32(0), :], mask=ok, other=0)
            for part in range(1, sks):
                v = v + _backend.load(v_ref.at[t, m, jnp.int32(jb), jnp.int32(part), :], mask=ok, other=0)
            vs.append(v[:, None])

        def body(qi, carry):
            q0 = qi * bn
            col_ok = _backend.column_mask(q0, bn, ncols, exact)
            acc = jnp.zeros((R, bn), jnp.float32)
            for v, w in zip(vs, b_tiles(q0, col_ok)):
                acc = acc + v * w.astype(jnp.float32)
            yv = _backend.load(y_ref.at[t, pl.ds(y0 + q0, bn)], mask=col_ok, other=0)
            out = yv.astype(jnp.float32) + jnp.sum(acc, axis=0)
            _backend.store(o_ref.at[t, pl.ds(y0 + q0, bn)], out.astype(o_ref.dtype), mask=col_ok)
            return carry

        lax.fori_loop(0, n_cols, body, 0)


def _grouped(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, *, dims, interpret, bk, bn, num_warps,
             expand_warps, tm, gks, sks, grouping, column_masks, num_stages=2):
    """Both grouped kernels: the plan's tables (for "sort"/"runs", XLA's sort and scans), shrink, expand."""
    plan = grouped_plan(token_slot, layer, ranks, dims=dims, tm=tm, grouping=grouping)
    kw = dict(dims=dims, interpret=interpret, tm=tm, gks=gks, sks=sks, column_masks=column_masks,
              in_kernel=grouping == "kernel")
    v = grouped_shrink_pallas(x, pool, a_pages, scales, plan, bk=bk, num_warps=num_warps, num_stages=num_stages, **kw)
    return grouped_expand_pallas(y, v, pool, b_pages, plan, bn=bn, num_warps=expand_warps, num_stages=num_stages,
                                 **kw)


def grouped_plan(token_slot, layer, ranks, *, dims, tm=GROUP_TOKENS, grouping="kernel"):
    """The operands both grouped kernels read first: (layer [1], the grouping's tables..., ranks), int32."""
    layer_v = layer_operand(layer)
    if grouping == "kernel":
        tables = (kernel_plan_keys(token_slot, dims),)
    else:
        tables = decode_plan(token_slot, dims, tm=tm, sort=grouping == "sort")
    return (layer_v, *tables, ranks.astype(jnp.int32))


def grouped_shrink_pallas(x, pool, a_pages, scales, plan, *, dims, interpret, bk, tm, gks, sks, num_warps,
                          in_kernel, column_masks=False, num_stages=2):
    """The grouped shrink alone: v [T, M, RB, max(gks, sks), R] float32 partial sums per token, scaled (only
    the parts and rank blocks a token's tile uses are written). Public so that a benchmark can time the two
    kernels apart."""
    T, M, RB, R = dims.num_tokens, dims.num_modules, dims.rank_blocks, dims.page_rows
    args = _backend.kernel_operands(*plan, scales.astype(jnp.float32), a_pages.astype(jnp.int32), x, pool)
    return pl.pallas_call(
        functools.partial(_grouped_shrink_kernel, dims=dims, bk=bk, tm=tm, gks=gks, sks=sks,
                          exact=column_masks or dims.d_in % bk != 0, in_kernel=in_kernel),
        out_shape=_backend.output_struct((T, M, RB, max(gks, sks), R), jnp.float32, args[0]),
        grid=(T, M, RB * sks),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.no_block_spec,
        compiler_params=_backend.compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_decode_grouped_shrink",
    )(*args)


def grouped_expand_pallas(y, v, pool, b_pages, plan, *, dims, interpret, bn, tm, gks, sks, num_warps, in_kernel,
                          column_masks=False, num_stages=2):
    """The grouped expand alone: y + v B, y aliased to the output."""
    chunks = jnp.asarray(output_chunks(dims))
    return _backend.update_in_place(
        functools.partial(_grouped_expand_kernel, dims=dims, bn=bn, tm=tm, gks=gks, sks=sks,
                          exact=column_masks or any(d % bn for d in dims.out_sizes), in_kernel=in_kernel),
        *plan, b_pages.astype(jnp.int32), chunks, v, pool, y,
        grid=(dims.num_tokens, chunks.shape[0]), num_warps=num_warps, num_stages=num_stages, interpret=interpret,
        name="lora_decode_grouped_expand",
    )


@functools.partial(jax.jit, static_argnames=("dims", "interpret", "block_k", "block_n", "num_warps", "fused",
                                             "k_splits", "expand_per_chunk", "expand_warps", "column_masks",
                                             "grouping", "group_splits", "single_splits", "num_stages",
                                             "live_blocks"))
def lora_decode_pallas(
    y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, plan=None, *,
    dims: LoraDims, interpret: bool, block_k: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, fused: bool = False, k_splits: int | None = None,
    expand_per_chunk: bool | None = None,
    expand_warps: int | None = None, column_masks: bool = False, grouping: str | None = None,
    group_splits: int | None = None, single_splits: int | None = None, num_stages: int = 2,
    live_blocks: bool | None = None,
):
    """Shapes as `lora_decode` (token_slot as given: every path treats ids outside [0, S) as no adapter). block_k /
    block_n are capped to the largest power of two dividing W.
    plan: the "tiles" grouping's `tiles_triton.tile_plan`, or None (computed here); other groupings ignore it.
    grouping: "kernel" / "sort" / "runs" (the grouped kernels: tokens sharing an adapter read it once per tile
      of GROUP_TOKENS; see "Grouped MBGMV" above for where the tiles come from) or "none" (the per-token
      kernels); default DEFAULT_GROUPING. Sizes the
      grouped kernels cannot take (`grouped_unsupported_reason`) use the per-token kernels.
    group_splits / single_splits (grouped kernels, powers of two): programs sharing one group tile's / one
      lone token's pass over d_in (defaults GROUP_SPLITS and `default_single_splits`).
    num_stages: the Triton pipeline depth of the kernels' loops (deeper keeps more of a program's loads in flight).
    The knobs below apply to the per-token kernels (grouping="none"):
    fused: the one-launch variant (slower on the H200, see the module docstring).
    k_splits (a power of two): the shrink splits d_in over this many programs per rank block (shorter
    loops, more loads in flight); the expand sums their partial products. On the H200 at T = 256, 2 ran
    within 2% of 1 and 4 ran 3-13% slower (benchmarks/results/kernels-lora_decode-ksplits-2026-11-28.json).
    expand_per_chunk: one expand program per (token, page chunk of a module), looping over the chunk's
      block_n-column blocks, instead of one per (token, block).
    k_splits, expand_per_chunk and block_n default by batch size (`per_token_knobs`).
    expand_warps: the expand's warps (default: num_warps).
    column_masks: mask every block's columns one by one even where sizes are multiples of the blocks (the
      kernels before 2026-11-28's change, kept to measure it: see `_backend.column_mask`).
    live_blocks: the per-chunk expand multiplies only the rank blocks below each token's rank (see
      `_expand_chunk_kernel`); False is the kernel before, kept to measure it; None: LIVE_RANK_BLOCKS."""
    grouping = grouping or DEFAULT_GROUPING
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    bk = pow2_divisor(dims.width, block_k or BLOCK_K)
    bn = pow2_divisor(dims.width, block_n or BLOCK_N)
    if grouping == "tiles" and not fused and tiles_triton.unsupported_reason(dims, block_k, block_n) is None:
        if (expand_per_chunk is not None or single_splits or group_splits or expand_warps or column_masks
                or num_stages != 2 or live_blocks is not None):
            raise ValueError("expand_per_chunk, single_splits, group_splits, expand_warps, column_masks, num_stages "
                             "and live_blocks are not knobs of the tile kernels")
        return tiles_triton.lora_decode_tiles(
            y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, plan, dims=dims, interpret=interpret,
            block_k=block_k or tiles_triton.BLOCK_K, block_n=block_n or tiles_triton.BLOCK_N, k_splits=k_splits,
            num_warps=num_warps or tiles_triton.NUM_WARPS)
    if grouping != "none" and grouping != "tiles" and not fused and grouped_unsupported_reason(dims, bk, bn) is None:
        if k_splits not in (None, 1) or (expand_per_chunk is not None and not expand_per_chunk):
            raise ValueError("k_splits and expand_per_chunk are knobs of the per-token kernels (grouping='none')")
        if grouping == "kernel" and dims.num_tokens > KERNEL_PLAN_MAX_TOKENS:
            grouping = "sort"
        gks = group_splits or GROUP_SPLITS
        sks = single_splits or default_single_splits(dims, bk)
        for name, v in (("group_splits", gks), ("single_splits", sks)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        return _grouped(y, x, pool, layer, a_pages, b_pages, ranks, scales, sanitize_slots(token_slot, dims), dims=dims,
                        interpret=interpret, bk=bk, bn=bn, num_warps=num_warps or 4,
                        expand_warps=expand_warps or num_warps or 4, tm=GROUP_TOKENS, gks=gks, sks=sks,
                        grouping=grouping, column_masks=column_masks, num_stages=num_stages)
    if fused:
        # Tiles of max_rank x block rows: ~16K elements, a size the split kernel's [R, 512] tiles x 2 stages use.
        blk = max(16, 16384 // next_pow2(dims.max_rank))
        return _fused(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, dims=dims, interpret=interpret,
                      bk=pow2_divisor(dims.width, block_k or blk), bn=pow2_divisor(dims.width, block_n or blk),
                      num_warps=num_warps or 4)
    bk, bn, ks, per_chunk = per_token_knobs(dims, block_k, block_n, k_splits, expand_per_chunk)
    return _split(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, dims=dims, interpret=interpret,
                  bk=bk, bn=bn, num_warps=num_warps or 4, ks=ks, per_chunk=per_chunk,
                  expand_warps=expand_warps or num_warps or 4, column_masks=column_masks,
                  live_blocks=LIVE_RANK_BLOCKS if live_blocks is None else live_blocks, num_stages=num_stages)


def per_token_knobs(dims: LoraDims, block_k=None, block_n=None, k_splits=None, expand_per_chunk=None):
    """(bk, bn, k_splits, expand_per_chunk) of the per-token kernels: those given, the rest by batch size
    (see SMALL_BATCH_TOKENS)."""
    small = dims.num_tokens <= SMALL_BATCH_TOKENS
    bk = pow2_divisor(dims.width, block_k or BLOCK_K)
    bn = pow2_divisor(dims.width, block_n or (SMALL_BLOCK_N if small else BLOCK_N))
    ks = (default_single_splits(dims, bk) if small else 1) if k_splits is None else k_splits  # 0 stays an error
    per_chunk = (not small) if expand_per_chunk is None else bool(expand_per_chunk)
    return bk, bn, ks, per_chunk


def _fused(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, *, dims, interpret, bk, bn, num_warps):
    T, M = dims.num_tokens, dims.num_modules
    mods = jnp.asarray(np.array([dims.offsets, dims.out_sizes], np.int32).T)  # [M, (y column, width)]
    pool_rows = pool.reshape(dims.num_layers, dims.num_pages * dims.page_rows, dims.width)
    return _backend.update_in_place(
        functools.partial(_fused_kernel, dims=dims, bk=bk, bn=bn, nblk=cdiv(max(dims.out_sizes), bn)),
        layer_operand(layer), token_slot.astype(jnp.int32),
        ranks.astype(jnp.int32), scales.astype(jnp.float32), a_pages.astype(jnp.int32), b_pages.astype(jnp.int32),
        mods, x, pool_rows, y,
        grid=(T, M), num_warps=num_warps, interpret=interpret, name="lora_decode_fused",
    )


def _split(y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, *, dims, interpret, bk, bn, num_warps, ks,
           per_chunk, expand_warps, column_masks, live_blocks=True, num_stages=2):
    v = shrink_pallas(x, pool, layer, a_pages, ranks, scales, token_slot, dims=dims, interpret=interpret, bk=bk,
                      num_warps=num_warps, ks=ks, column_masks=column_masks, num_stages=num_stages)
    return expand_pallas(y, v, pool, layer, b_pages, ranks, token_slot, dims=dims, interpret=interpret, bn=bn,
                         num_warps=expand_warps, ks=ks, per_chunk=per_chunk, column_masks=column_masks,
                         live_blocks=live_blocks, num_stages=num_stages)


def shrink_pallas(x, pool, layer, a_pages, ranks, scales, token_slot, *, dims, interpret, bk, num_warps, ks,
                  column_masks=False, num_stages=2):
    """The split variant's first kernel alone: v [T, M, RB, R] (or [T, M, RB, ks, R]) float32, scaled.
    Public so that a benchmark can time the two kernels apart."""
    if ks < 1 or ks & (ks - 1):
        raise ValueError(f"k_splits must be a power of two, got {ks}")
    T, M, RB, R = dims.num_tokens, dims.num_modules, dims.rank_blocks, dims.page_rows
    layer_v = layer_operand(layer)
    shrink_args = _backend.kernel_operands(
        layer_v, token_slot.astype(jnp.int32), ranks.astype(jnp.int32), scales.astype(jnp.float32),
        a_pages.astype(jnp.int32), x, pool
    )
    return pl.pallas_call(
        functools.partial(_shrink_kernel, dims=dims, bk=bk, ks=ks, exact=column_masks or dims.d_in % bk != 0),
        out_shape=_backend.output_struct((T, M, RB, R) if ks == 1 else (T, M, RB, ks, R), jnp.float32,
                                         shrink_args[0]),
        grid=(T, M, RB * ks),
        in_specs=[pl.no_block_spec] * 7,
        out_specs=(pl.BlockSpec((None, None, None, R), lambda t, m, j: (t, m, j, 0)) if ks == 1 else
                   pl.BlockSpec((None, None, None, None, R), lambda t, m, p: (t, m, p // ks, p % ks, 0))),
        compiler_params=_backend.compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_decode_shrink",
    )(*shrink_args)


def expand_pallas(y, v, pool, layer, b_pages, ranks, token_slot, *, dims, interpret, bn, num_warps, ks,
                  per_chunk=False, column_masks=False, live_blocks=True, num_stages=2):
    """The split variant's second kernel alone: y + v B (y aliased to the output); per_chunk: one program per
    (token, page chunk) looping over its blocks, else one per (token, block)."""
    layer_v = layer_operand(layer)
    blocks = jnp.asarray(output_chunks(dims) if per_chunk else output_blocks(dims, bn))
    kernel = _expand_chunk_kernel if per_chunk else _expand_kernel
    live = dict(live_blocks=live_blocks) if per_chunk else {}
    return _backend.update_in_place(
        functools.partial(kernel, dims=dims, bn=bn, ks=ks, exact=column_masks or any(d % bn for d in dims.out_sizes),
                          **live),
        layer_v, token_slot.astype(jnp.int32), ranks.astype(jnp.int32), b_pages.astype(jnp.int32), blocks, v, pool, y,
        grid=(dims.num_tokens, blocks.shape[0]), num_warps=num_warps, num_stages=num_stages, interpret=interpret,
        name="lora_decode_expand",
    )
