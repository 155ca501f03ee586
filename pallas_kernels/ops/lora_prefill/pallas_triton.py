"""Pallas (Triton lowering) MBGMM: multi-adapter LoRA over runs of tokens, straight from the page pool.

Tokens come in runs sharing a slot (the engine sorts by adapter); `tiles.segment_tiles` cuts them
into tiles of <= TM tokens of one slot, on device, into a static-size list (the engine computes it once per
step, `lora_prefill_tiles`). The kernels check each tile's rows and slot themselves.
  shrink  grid (M, NT): (module m, tile i) loads x[tile, BK-column block] and the A^T rows of all of
          m's rank blocks at once as a gather [RK, BK] through `a_pages` (rows past the module's rank
          masked: no bytes for them), accumulating v_m = x @ A_m with tl.dot into [TM, RK] f32; then
          v * scale goes to a [T, M, RK] buffer in the pool's dtype. (``shrink_per_module=False``: grid
          (NT,), one program for all modules, x read once.)
  expand  grid (NT, chunks): (tile, W-column page chunk of one module) loads v [TM, RK] and the B rows'
          pages once, then loops over the chunk's BN-column blocks: B rows [RK, BN] (gathered through
          `b_pages`, masked past the rank) and y [TM, BN]; y += v @ B with tl.dot (v in the pool dtype,
          as S-LoRA rounds it), y aliased input->output. (``expand_per_chunk=False``: one program per
          (tile, BN block).)
Bound: bytes. y is read+written once and x read once per module (the M programs of one tile are dispatched
together and share its x through L2); adapter weights (r * (d_in*M + sum d_out) per slot) are re-read per tile, from L2.
FLOPs per token are 2 * RK * (M*d_in + sum d_out) against 2 * d_in + 4 * sum d_out bytes of x and y:
for q/k/v at H = 4096, RK = 64 that is ~70 FLOP/byte, below the ~200 FLOP/byte ridge of an H200, so
computing on the padded RK rather than each slot's own rank costs no time; only the loads skip.
Why per module and per chunk: with 8192 tokens in 64 segments the per-tile grid had ~130 busy shrink
programs for 132 SMs, and the per-block expand reloaded v for every block; on the H200 the two changes
took the op from 55% to 67% of copy bandwidth in one run (benchmarks/NOTES.md, 2026-11-28). y's column offsets
come from a table, so the expand tells the compiler their alignment: without it y's loads and stores were not
vectorised (the expand 87 -> 75 us, 2026-12-01).
Unsorted slots overflow the static tile list; the api then sorts the tokens by slot first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels._checks import cdiv, matmul_precision, next_pow2, pow2_divisor
from pallas_kernels.ops.lora_layout import (LoraDims, kernel_layer, kernel_slot, layer_operand, output_blocks,
                                            output_chunks)


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


def _tile(start_ref, end_ref, tslot_ref, i, dims: LoraDims):
    """Tile i's (start, end, slot), checked in the kernel: rows outside [0, T) and slots outside [0, S) (no
    adapter) touch nothing, whoever computed the list (the engine passes one list to every layer's calls)."""
    T = dims.num_tokens
    return jnp.clip(start_ref[i], 0, T), jnp.minimum(end_ref[i], T), kernel_slot(tslot_ref[i], dims)


def _rows_ok(start, end, tm: int):
    return (start + jnp.arange(tm)) < end


def _shrink_kernel(
    layer_ref, start_ref, end_ref, tslot_ref, ranks_ref, scales_ref, a_pages_ref, x_ref, pool_ref, v_ref,
    *, dims: LoraDims, tm: int, bk: int, rk: int, per_module: bool, exact: bool, module_fastest: bool = False,
):
    # Grid (NT, M), or (M, NT) with module_fastest: the M programs of one tile dispatched one after another.
    i = pl.program_id(1 if per_module and module_fastest else 0)
    R, W = dims.page_rows, dims.width
    # All modules in one program (x read once), or program (i, m) for module m alone (M times the programs).
    mods = [pl.program_id(0 if module_fastest else 1)] if per_module else list(range(dims.num_modules))
    M = len(mods)
    layer, (start, end, slot) = kernel_layer(layer_ref, dims), _tile(start_ref, end_ref, tslot_ref, i, dims)
    s = jnp.maximum(slot, 0)
    rank = [jnp.where(slot >= 0, jnp.clip(ranks_ref[s, layer, m], 0, dims.max_rank), 0) for m in mods]
    any_rank = functools.reduce(jnp.maximum, rank)

    @pl.when(any_rank > 0)
    def _():
        row_ok = _rows_ok(start, end, tm)
        rr, blk, within = _rank_rows(dims, rk)
        prec = matmul_precision(pool_ref.dtype)

        def body(kb, accs):
            k0 = kb * bk
            c = k0 // W
            col_ok = _backend.column_mask(k0, bk, dims.d_in, exact)
            xk = _backend.load(
                x_ref.at[pl.ds(start, tm), pl.ds(k0, bk)], mask=row_ok[:, None] & col_ok[None, :], other=0
            )
            out = []
            for n, m in enumerate(mods):
                pages = jnp.clip(a_pages_ref[s, m, c, blk], 0, dims.num_pages - 1)
                cols = k0 - c * W + jnp.arange(bk)
                w = _backend.load(
                    pool_ref.at[layer, (pages * R + within)[:, None], cols[None, :]],
                    mask=(rr < rank[n])[:, None] & col_ok[None, :], other=0,
                )
                out.append(accs[n] + lax.dot_general(
                    xk, w, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
                ))
            return tuple(out)

        zero = jnp.zeros((tm, rk), jnp.float32)
        accs = lax.fori_loop(0, cdiv(dims.d_in, bk), body, tuple(zero for _ in range(M)))
        for n, m in enumerate(mods):
            _backend.store(
                v_ref.at[pl.ds(start, tm), jnp.int32(m), :],
                (accs[n] * scales_ref[s, layer, m].astype(jnp.float32)).astype(v_ref.dtype),
                mask=row_ok[:, None],
            )


def _expand_kernel(
    layer_ref, start_ref, end_ref, tslot_ref, ranks_ref, b_pages_ref, blocks_ref, v_ref, pool_ref, y_ref, o_ref,
    *, dims: LoraDims, tm: int, bn: int, rk: int, exact: bool,
):
    i, b = pl.program_id(0), pl.program_id(1)
    R = dims.page_rows
    layer, (start, end, slot) = kernel_layer(layer_ref, dims), _tile(start_ref, end_ref, tslot_ref, i, dims)
    m, c, col, y0, ncols = (blocks_ref[b, k] for k in range(5))
    s = jnp.maximum(slot, 0)
    rank = jnp.where(slot >= 0, jnp.clip(ranks_ref[s, layer, m], 0, dims.max_rank), 0)

    @pl.when(rank > 0)
    def _():
        row_ok = _rows_ok(start, end, tm)
        col_ok = _backend.column_mask(0, bn, ncols, exact)
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


def _expand_chunk_kernel(
    layer_ref, start_ref, end_ref, tslot_ref, ranks_ref, b_pages_ref, chunks_ref, v_ref, pool_ref, y_ref, o_ref,
    *, dims: LoraDims, tm: int, bn: int, rk: int, exact: bool, y_align: int = 1,
):
    """Program (tile, chunk): one W-column page chunk of one module as a loop over its BN-column blocks; v
    and the B rows' pages are loaded once per chunk instead of once per block. y_align: a power of two that
    divides every chunk's first y column (known from the static table), told to the compiler: a column offset
    read from a table is otherwise of unknown alignment, and y's loads and stores could not be vectorised."""
    i, b = pl.program_id(0), pl.program_id(1)
    R = dims.page_rows
    layer, (start, end, slot) = kernel_layer(layer_ref, dims), _tile(start_ref, end_ref, tslot_ref, i, dims)
    m, c, y0, ncols = (chunks_ref[b, k] for k in range(4))
    if y_align > 1:
        y0 = pl.multiple_of(y0, y_align)
    s = jnp.maximum(slot, 0)
    rank = jnp.where(slot >= 0, jnp.clip(ranks_ref[s, layer, m], 0, dims.max_rank), 0)

    @pl.when(rank > 0)
    def _():
        row_ok = _rows_ok(start, end, tm)
        rr, blk, within = _rank_rows(dims, rk)
        v = _backend.load(v_ref.at[pl.ds(start, tm), m, :], mask=row_ok[:, None], other=0).astype(pool_ref.dtype)
        rows = (jnp.clip(b_pages_ref[s, m, c, blk], 0, dims.num_pages - 1) * R + within)[:, None]
        rank_ok = (rr < rank)[:, None]

        def body(j, carry):
            q0 = j * bn
            col_ok = _backend.column_mask(q0, bn, ncols, exact)
            w = _backend.load(pool_ref.at[layer, rows, (q0 + jnp.arange(bn))[None, :]], mask=rank_ok & col_ok[None, :],
                              other=0)
            acc = lax.dot_general(v, w, (((1,), (0,)), ((), ())), precision=matmul_precision(w.dtype),
                                  preferred_element_type=jnp.float32)
            ok = row_ok[:, None] & col_ok[None, :]
            yv = _backend.load(y_ref.at[pl.ds(start, tm), pl.ds(y0 + q0, bn)], mask=ok, other=0)
            _backend.store(o_ref.at[pl.ds(start, tm), pl.ds(y0 + q0, bn)],
                           (yv.astype(jnp.float32) + acc).astype(o_ref.dtype), mask=ok)
            return carry

        lax.fori_loop(0, dims.width // bn, body, 0)


@functools.partial(
    jax.jit, static_argnames=("dims", "interpret", "num_tiles", "block_tokens", "block_k", "block_n", "num_warps",
                              "shrink_per_module", "expand_per_chunk", "column_masks", "module_fastest",
                              "y_align_hint", "num_stages")
)
def lora_prefill_pallas(
    y, x, pool, layer, a_pages, b_pages, ranks, scales, tiles, *,
    dims: LoraDims, interpret: bool, num_tiles: int, block_tokens: int = 64, block_k: int = 128,
    block_n: int = 128, num_warps: int = 4, shrink_per_module: bool = True, expand_per_chunk: bool = True,
    column_masks: bool = False, module_fastest: bool = True, y_align_hint: bool = True, num_stages: int | None = None,
):
    """Shapes as `lora_prefill`; `tiles` = (start, end, slot) [num_tiles] from `tiles.segment_tiles`.
    shrink_per_module: one shrink program per (tile, module) instead of per tile (M times the programs, x
    re-read per module, from L2); expand_per_chunk: one expand program per (tile, page chunk), looping over its blocks;
    column_masks: mask columns one by one even where sizes are multiples of the blocks (see
    `_backend.column_mask`; kept to measure it); module_fastest: the per-module shrink's grid as (M, NT), so that
    the M programs reading one tile's x are dispatched together; y_align_hint: see `_expand_chunk_kernel`;
    num_stages: the Triton pipeline depth of both kernels' loops; None: 3 where three stages of a loop's tiles fit
      STAGE_BYTES, else 2 (`default_stages`).
    These defaults were measured on the H200 (benchmarks/NOTES.md, "MBGMM at 78%"; 8192 tokens in 64 segments,
    rank 64, q/k/v, bf16): the hint took the expand from 87.0 to 75.5 us, a third pipeline stage with it to 69.3
    (a fourth, without the hint: 96.4 against 83.1 for three), and the module-fastest grid the shrink from 62.2
    to 61.3 us."""
    if num_stages is None:
        num_stages = default_stages(dims, block_tokens, block_k, block_n, x.dtype.itemsize)
    kw = dict(dims=dims, interpret=interpret, tm=block_tokens, num_warps=num_warps, column_masks=column_masks,
              num_stages=num_stages)
    v = shrink_pallas(x, pool, layer, a_pages, ranks, scales, tiles, bk=block_k, per_module=shrink_per_module,
                      module_fastest=module_fastest and num_tiles <= MAX_GRID_Y, **kw)
    return expand_pallas(y, v, pool, layer, b_pages, ranks, tiles, bn=block_n, per_chunk=expand_per_chunk,
                         y_align_hint=y_align_hint, **kw)


# Shared memory the pipelined tiles of one loop may take (an H200 SM has ~227 KiB; headroom for the compiler's
# own buffers): three stages of bf16 tiles at rank 64 take 96 KiB; float32 at rank 64 would take 192 KiB.
STAGE_BYTES = 160 << 10
# Tiles past CUDA's y and z grid limit put the module-fastest shrink's tile axis out of range: the (NT, M) grid.
MAX_GRID_Y = 65535


def default_stages(dims: LoraDims, tm: int, bk: int, bn: int, itemsize: int) -> int:
    """3 pipeline stages where three of the larger loop's tiles ([TM + RK] rows of BK or BN columns) fit
    STAGE_BYTES, else 2."""
    rk = max(16, next_pow2(dims.max_rank))
    per_stage = (tm + rk) * max(pow2_divisor(dims.width, bk), pow2_divisor(dims.width, bn)) * itemsize
    return 3 if 3 * per_stage <= STAGE_BYTES else 2


def _common(dims, pool, layer, tiles):
    layer_v = layer_operand(layer)  # clipped in the kernels (`kernel_layer`)
    pool_rows = pool.reshape(dims.num_layers, dims.num_pages * dims.page_rows, dims.width)  # free: rows of all pages
    return layer_v, pool_rows, tiles[0], tiles[1], tiles[2], max(16, next_pow2(dims.max_rank))


def shrink_pallas(x, pool, layer, a_pages, ranks, scales, tiles, *, dims, interpret, tm, bk, num_warps,
                  per_module=False, column_masks=False, module_fastest=False, num_stages=2):
    """MBGMM's first kernel alone: v [T, M, RK] scaled, in the pool's dtype (the expand's tl.dot takes v in
    that dtype anyway; storing it so halves the bytes every output block re-reads). Public so that a
    benchmark can time the two kernels apart."""
    layer_v, pool_rows, start, end, tslot, rk = _common(dims, pool, layer, tiles)
    bk = pow2_divisor(dims.width, bk)
    args = _backend.kernel_operands(
        layer_v, start, end, tslot, ranks.astype(jnp.int32), scales.astype(jnp.float32), a_pages.astype(jnp.int32), x,
        pool_rows
    )
    return pl.pallas_call(
        functools.partial(_shrink_kernel, dims=dims, tm=tm, bk=bk, rk=rk, per_module=per_module,
                          exact=column_masks or dims.d_in % bk != 0, module_fastest=module_fastest),
        out_shape=_backend.output_struct((dims.num_tokens, dims.num_modules, rk), pool.dtype, args[0]),
        grid=(((dims.num_modules, start.shape[0]) if module_fastest else (start.shape[0], dims.num_modules))
              if per_module else (start.shape[0],)),
        in_specs=[pl.no_block_spec] * 9,
        out_specs=pl.no_block_spec,
        compiler_params=_backend.compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_prefill_shrink",
    )(*args)


def expand_pallas(y, v, pool, layer, b_pages, ranks, tiles, *, dims, interpret, tm, bn, num_warps, per_chunk=False,
                  column_masks=False, y_align_hint=False, num_stages=2):
    """MBGMM's second kernel alone: y + v B, y aliased to the output."""
    layer_v, pool_rows, start, end, tslot, rk = _common(dims, pool, layer, tiles)
    bn = pow2_divisor(dims.width, bn)
    table = output_chunks(dims) if per_chunk else output_blocks(dims, bn)
    kernel = _expand_chunk_kernel if per_chunk else _expand_kernel
    hint = dict(y_align=y_alignment(table[:, 2]) if y_align_hint else 1) if per_chunk else {}
    return _backend.update_in_place(
        functools.partial(kernel, dims=dims, tm=tm, bn=bn, rk=rk,
                          exact=column_masks or any(d % bn for d in dims.out_sizes), **hint),
        layer_v, start, end, tslot, ranks.astype(jnp.int32), b_pages.astype(jnp.int32), jnp.asarray(table), v,
        pool_rows, y, grid=(start.shape[0], table.shape[0]), num_warps=num_warps, num_stages=num_stages,
        interpret=interpret, name="lora_prefill_expand",
    )


def y_alignment(columns, cap: int = 64) -> int:
    """The largest power of two <= cap dividing every one of a static table's y columns (the expand's hint)."""
    return min(pow2_divisor(int(c), cap) for c in columns)
