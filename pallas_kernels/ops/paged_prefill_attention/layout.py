"""Static sizes and input checks of `paged_prefill_attention`."""

from __future__ import annotations

import dataclasses
from typing import Optional

from pallas_kernels._checks import check_array, check_paged_query
from pallas_kernels.ops._paged import PagedHeads


@dataclasses.dataclass(frozen=True)
class PagedPrefillDims(PagedHeads):
    num_tokens: int  # T
    num_q_heads: int  # Nq
    head_dim: int  # D
    num_kv_heads: int  # Nkv = W // D
    num_layers: int
    num_pages: int
    page_rows: int  # R
    num_rows: int  # requests with a page table
    num_blocks: int  # NB, page-table entries per request
    sm_scale: float
    sliding_window: Optional[int]


def validate(op, q, pool, layer, token_row, positions, k_pages, v_pages, sm_scale, sliding_window) -> PagedPrefillDims:
    T, Nq, D, Nkv, L, P, R = check_paged_query(op, q, pool, layer, sm_scale, sliding_window)
    check_array(op, "token_row", token_row, ndim=1, kind="int", shape=(T,))
    check_array(op, "positions", positions, ndim=1, kind="int", shape=(T,))
    check_array(op, "k_pages", k_pages, ndim=2, kind="int")
    check_array(op, "v_pages", v_pages, ndim=2, kind="int", shape=k_pages.shape)
    rows, nb = k_pages.shape
    return PagedPrefillDims(T, Nq, D, Nkv, L, P, R, rows, nb, float(sm_scale), sliding_window)
