"""The LoRA-in-the-page-pool layout shared by `lora_decode` and `lora_prefill`, and its checks.

Page pool `pool[L, P, R, W]`. For adapter slot s and module m, A^T [r, d_in] and B [r, d_out] are cut
into tiles of R rank rows x W columns: `a_pages[s, m, c, j]` holds A^T[j*R:(j+1)*R, c*W:(c+1)*W] and
`b_pages[s, m, c, j]` holds B[j*R:(j+1)*R, c*W:(c+1)*W]. Rank blocks j >= ceil(rank/R) never count,
and neither do rows past the rank or columns past d_in / d_out, whatever the pages hold there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels._checks import as_index_vector, cdiv, check_array, check_layer, check_pool
from pallas_kernels._errors import KernelInputError


@dataclasses.dataclass(frozen=True)
class LoraDims:
    """Static sizes of one LoRA call."""

    num_tokens: int  # T
    d_in: int
    out_sizes: tuple[int, ...]  # d_out of each module, in y's column order
    num_layers: int  # L
    num_pages: int  # P
    page_rows: int  # R
    width: int  # W
    num_slots: int  # S
    in_chunks: int  # CHin = ceil(d_in / W)
    out_chunks_max: int  # CHout_max (b_pages' third axis)
    rank_blocks: int  # RB (page tables' last axis); max rank = RB * R

    @property
    def num_modules(self) -> int:
        return len(self.out_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.out_sizes:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def d_out_total(self) -> int:
        return sum(self.out_sizes)

    @property
    def max_rank(self) -> int:
        return self.rank_blocks * self.page_rows


def validate_lora_args(op, y, x, pool, layer, a_pages, b_pages, ranks, scales, token_slot, out_sizes) -> LoraDims:
    """Check every array against the layout; return the static sizes or raise KernelInputError."""
    if not isinstance(out_sizes, (tuple, list)) or not out_sizes or not all(
        isinstance(n, int) and n > 0 for n in out_sizes
    ):
        raise KernelInputError(f"{op}: out_sizes must be a non-empty tuple of positive ints, got {out_sizes!r}")
    out_sizes = tuple(int(n) for n in out_sizes)
    pool_dtype = check_pool(op, pool)
    L, P, R, W = pool.shape
    check_array(op, "x", x, ndim=2, kind="float")
    T, d_in = x.shape
    check_array(op, "y", y, ndim=2, kind="float", shape=(T, sum(out_sizes)))
    check_array(op, "token_slot", token_slot, ndim=1, kind="int", shape=(T,))
    check_array(op, "a_pages", a_pages, ndim=4, kind="int")
    S, M, CHin, RB = a_pages.shape
    if M != len(out_sizes):
        raise KernelInputError(f"{op}: a_pages has {M} modules but out_sizes names {len(out_sizes)}")
    if CHin != cdiv(d_in, W):
        raise KernelInputError(
            f"{op}: a_pages must have ceil(d_in/W) = ceil({d_in}/{W}) = {cdiv(d_in, W)} input chunks, got {CHin}"
        )
    check_array(op, "b_pages", b_pages, ndim=4, kind="int", shape=(S, M, None, RB))
    need_out = max(cdiv(n, W) for n in out_sizes)
    if b_pages.shape[2] < need_out:
        raise KernelInputError(
            f"{op}: b_pages must have at least ceil(max(out_sizes)/W) = {need_out} output chunks, "
            f"got {b_pages.shape[2]}"
        )
    check_array(op, "ranks", ranks, ndim=3, kind="int", shape=(S, L, M))
    check_array(op, "scales", scales, ndim=3, kind="float", shape=(S, L, M))
    check_layer(op, layer, L)
    if x.dtype != pool_dtype:
        raise KernelInputError(f"{op}: x dtype {x.dtype} must match the pool dtype {pool_dtype}")
    return LoraDims(
        num_tokens=T, d_in=d_in, out_sizes=out_sizes, num_layers=L, num_pages=P, page_rows=R, width=W,
        num_slots=S, in_chunks=CHin, out_chunks_max=b_pages.shape[2], rank_blocks=RB,
    )


def slot_or_none(slot, num_slots: int):
    """Slot ids with every one outside [0, S) turned into -1 (no adapter): in XLA or inside a kernel alike."""
    return jnp.where((slot >= 0) & (slot < num_slots), slot, -1)


def sanitize_slots(token_slot, dims: LoraDims):
    """int32 slots with every id outside [0, S) turned into -1 (no adapter), for all backends alike."""
    return slot_or_none(jnp.asarray(token_slot).astype(jnp.int32), dims.num_slots)


def layer_operand(layer):
    """The layer as the decode kernels take it: an int32 [1] operand, clipped by `kernel_layer` inside them."""
    return as_index_vector(layer).astype(jnp.int32)


def kernel_layer(layer_ref, dims: LoraDims):
    """Inside a kernel: the layer, clipped into [0, L). Done by XLA before the kernel, it was a launch of its own
    per call (~1 us on the H200)."""
    return jnp.clip(layer_ref[0], 0, dims.num_layers - 1)


def kernel_slot(slot, dims: LoraDims):
    """Inside a kernel: a slot id, -1 (no adapter) wherever it lies outside [0, S) (as `sanitize_slots`)."""
    return slot_or_none(slot, dims.num_slots)


def kernel_slot_rank(slot, ranks_ref, layer, m, dims: LoraDims):
    """Inside a kernel: (slot clipped for table reads, module m's rank of a checked slot at this layer; 0 for -1)."""
    s = jnp.maximum(slot, 0)
    return s, jnp.where(slot >= 0, jnp.clip(ranks_ref[s, layer, m], 0, dims.max_rank), 0)


def for_live_rank_blocks(rank, dims: LoraDims, fn) -> None:
    """Inside a kernel: fn(n) in the branch for n live rank blocks (n = ceil(rank / R), 1..RB; none for rank 0),
    so a kernel unrolls only the blocks below a token's rank. A masked block loads no bytes, but its arithmetic
    still issues."""
    R = dims.page_rows
    for live in range(1, dims.rank_blocks + 1):
        pl.when((rank > (live - 1) * R) & (rank <= live * R))(functools.partial(fn, live))


def token_ranks(ranks, scales, token_slot, layer, dims: LoraDims):
    """Per-token rank [T, M] int32 (0 where slot < 0, clipped to the table's max rank), scale [T, M] f32."""
    has = token_slot >= 0
    s = jnp.clip(token_slot, 0, dims.num_slots - 1)
    layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(()), 0, dims.num_layers - 1)
    r = jnp.clip(ranks[s, layer].astype(jnp.int32), 0, dims.max_rank)
    r = jnp.where(has[:, None], r, 0)
    sc = scales[s, layer].astype(jnp.float32)
    return r, sc


def output_chunks(dims: LoraDims) -> np.ndarray:
    """Static table of y's page chunks: rows (module, chunk, y column, valid columns)."""
    return np.asarray([(m, c, off + c * dims.width, min(dims.width, d_out - c * dims.width))
                       for m, (off, d_out) in enumerate(zip(dims.offsets, dims.out_sizes))
                       for c in range(cdiv(d_out, dims.width))], np.int32)


def output_blocks(dims: LoraDims, bn: int) -> np.ndarray:
    """Static table of y's column blocks: rows (module, chunk, column in chunk, y column, valid columns)."""
    rows = []
    for m, (off, d_out) in enumerate(zip(dims.offsets, dims.out_sizes)):
        for q0 in range(0, d_out, bn):
            rows.append((m, q0 // dims.width, q0 % dims.width, off + q0, min(bn, d_out - q0)))
    return np.asarray(rows, np.int32)
