"""Random inputs in the page-pool layout, shared by the kernel tests and benchmarks.

Everything here is numpy on the host. Pools are filled with NaN ("poison") wherever the layout
says a kernel must not look: unused pages, rows past an adapter's rank, columns past d_in/d_out,
so a kernel that reads there produces NaN instead of a plausible wrong number.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def np_dtype(name) -> np.dtype:
    """numpy dtype of "float32" / "bfloat16" (or a dtype)."""
    return BF16 if str(name) == "bfloat16" else np.dtype(name)


def rounded(a: np.ndarray, dtype) -> np.ndarray:
    """a as float64 after a round trip through dtype (what the kernel will actually see)."""
    return np.asarray(a).astype(np_dtype(dtype)).astype(np.float64)


@dataclasses.dataclass
class LoraCase:
    """A page pool holding S adapter slots for M fused modules, with their dense weights."""

    pool: np.ndarray  # [L, P, R, W] in dtype
    a_pages: np.ndarray  # [S, M, CHin, RB] int32
    b_pages: np.ndarray  # [S, M, CHout, RB] int32
    ranks: np.ndarray  # [S, L, M] int32
    scales: np.ndarray  # [S, L, M] float32
    a_t: np.ndarray  # [S, M, L, RB*R, d_in] float64 dense A^T (zero past the rank)
    b: np.ndarray  # [S, M, L, RB*R, max d_out] float64 dense B (zero past the rank / d_out)
    out_sizes: tuple[int, ...]


def make_lora_case(
    rng: np.random.Generator,
    *,
    num_layers: int,
    num_pages: int,
    page_rows: int,
    width: int,
    d_in: int,
    out_sizes: Sequence[int],
    ranks: np.ndarray,
    rank_blocks: Optional[int] = None,
    dtype="float32",
    poison: bool = True,
) -> LoraCase:
    """Pack random adapters with the given ranks [S, L, M] into a fresh pool at permuted pages.

    Page-table entries of rank blocks no layer uses get random (valid) page ids. A^T entries are
    ~N(0, 1/d_in) and B entries ~N(0, 1/r), so a delta is O(|x|).
    """
    L, P, R, W = num_layers, num_pages, page_rows, width
    ranks = np.asarray(ranks, np.int32)
    S, _, M = ranks.shape
    out_sizes = tuple(out_sizes)
    RB = rank_blocks if rank_blocks is not None else max(1, -(-int(ranks.max()) // R))
    CHin = -(-d_in // W)
    CHout = max(-(-n // W) for n in out_sizes)
    dt = np_dtype(dtype)
    pool = np.full((L, P, R, W), np.nan if poison else 0.0, np.float32)
    free = list(rng.permutation(P))
    a_pages = rng.integers(0, P, (S, M, CHin, RB)).astype(np.int32)
    b_pages = rng.integers(0, P, (S, M, CHout, RB)).astype(np.int32)
    a_t = np.zeros((S, M, L, RB * R, d_in))
    b = np.zeros((S, M, L, RB * R, max(out_sizes)))
    for s in range(S):
        for m in range(M):
            d_out = out_sizes[m]
            nb = -(-int(ranks[s, :, m].max()) // R)
            for j in range(nb):
                for c in range(CHin):
                    a_pages[s, m, c, j] = free.pop()
                for c in range(-(-d_out // W)):
                    b_pages[s, m, c, j] = free.pop()
            for l in range(L):
                r = int(ranks[s, l, m])
                a_t[s, m, l, :r] = rounded(rng.standard_normal((r, d_in)) / np.sqrt(d_in), dt)
                b[s, m, l, :r, :d_out] = rounded(rng.standard_normal((r, d_out)) / np.sqrt(max(r, 1)), dt)
                for j in range(nb):
                    for c in range(CHin):
                        _put_tile(pool[l, a_pages[s, m, c, j]], a_t[s, m, l], j, c, r, d_in, R, W, poison)
                    for c in range(-(-d_out // W)):
                        _put_tile(pool[l, b_pages[s, m, c, j]], b[s, m, l, :, :d_out], j, c, r, d_out, R, W, poison)
    scales = rng.uniform(0.5, 2.0, (S, L, M)).astype(np.float32)
    return LoraCase(pool.astype(dt), a_pages, b_pages, ranks, scales, a_t, b, out_sizes)


def _put_tile(page, dense, j, c, rank, cols, R, W, poison):
    """page[i, w] = dense[j*R+i, c*W+w] inside the valid rank/columns; poison (or zero) elsewhere."""
    page[...] = np.nan if poison else 0.0
    rows = min(R, max(0, rank - j * R))
    ncols = min(W, cols - c * W)
    page[:rows, :ncols] = dense[j * R : j * R + rows, c * W : c * W + ncols]


def kv_page_tables(rng: np.random.Generator, lengths: Sequence[int], num_blocks: int, num_pages: int, page_rows: int):
    """Distinct permuted K and V page ids for each request's blocks; unused tail entries random.

    Returns (k_pages [B, NB], v_pages [B, NB]) int32.
    """
    B = len(lengths)
    free = list(rng.permutation(num_pages))
    k_pages = rng.integers(0, num_pages, (B, num_blocks)).astype(np.int32)
    v_pages = rng.integers(0, num_pages, (B, num_blocks)).astype(np.int32)
    for b, n in enumerate(lengths):
        for blk in range(-(-int(n) // page_rows)):
            k_pages[b, blk] = free.pop()
            v_pages[b, blk] = free.pop()
    return k_pages, v_pages


def relative_error(out, ref, base=None) -> float:
    """||out - ref|| / ||ref - base|| in float64 (base = the poisoned output the op adds to, or 0).

    Non-finite values anywhere in out give inf.
    """
    out = np.asarray(out).astype(np.float64)
    ref = np.asarray(ref).astype(np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    denom = ref if base is None else ref - np.asarray(base).astype(np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(denom), 1e-30))


TOLERANCE = {"float32": 1e-5, "bfloat16": 1.5e-2}


_HLO_ARRAY = re.compile(r"=\s*(\w+)\[([\d,]*)\](?:\{[^}]*\})?\s+([\w-]+)\(")
_HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "u16": "uint16", "s32": "int32"}


def pool_sized_passes(hlo_text: str, pool_shape, pool_dtype) -> list[str]:
    """Instructions of a compiled HLO module (``.compile().as_text()``) that make a pass over a whole pool of
    ``pool_shape``: any result of the pool's element count (in any shape: a reshape keeps it) in another dtype
    than the pool's own (a widened copy, e.g. XLA:CPU's bf16 -> f32 normalisation), and any copy or conversion
    of that size. The pool's own parameter, in-place updates and bitcasts (reshapes) of it are not passes and
    are not listed. Pick a page count that no other array of the program shares (not a power of two)."""
    size = int(np.prod(pool_shape))
    want = np.dtype(np_dtype(pool_dtype)).name
    found = []
    for line in hlo_text.splitlines():
        m = _HLO_ARRAY.search(line)
        if not m:
            continue
        dtype, dims, op = m.groups()
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        if n != size:
            continue
        if _HLO_DTYPES.get(dtype, dtype) != want or op in ("copy", "convert", "bitcast-convert"):
            found.append(line.strip()[:200])
    return found
