"""Static sizes and input checks of `paged_decode_attention`."""

from __future__ import annotations

import dataclasses
from typing import Optional

from pallas_kernels._checks import check_array, check_paged_query
from pallas_kernels.ops._paged import PagedHeads


@dataclasses.dataclass(frozen=True)
class PagedAttentionDims(PagedHeads):
    batch: int  # B
    num_q_heads: int  # Nq
    head_dim: int  # D
    num_kv_heads: int  # Nkv = W // D
    num_layers: int
    num_pages: int
    page_rows: int  # R
    num_blocks: int  # NB, page-table entries per request
    sm_scale: float
    sliding_window: Optional[int]


def validate(op, q, pool, layer, k_pages, v_pages, lengths, sm_scale, sliding_window) -> PagedAttentionDims:
    B, Nq, D, Nkv, L, P, R = check_paged_query(op, q, pool, layer, sm_scale, sliding_window)
    check_array(op, "k_pages", k_pages, ndim=2, kind="int", shape=(B, None))
    check_array(op, "v_pages", v_pages, ndim=2, kind="int", shape=k_pages.shape)
    check_array(op, "lengths", lengths, ndim=1, kind="int", shape=(B,))
    return PagedAttentionDims(B, Nq, D, Nkv, L, P, R, k_pages.shape[1], float(sm_scale), sliding_window)
