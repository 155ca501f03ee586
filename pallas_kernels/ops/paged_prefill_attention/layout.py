"""Static sizes and input checks of `paged_prefill_attention`."""

from __future__ import annotations

import dataclasses
from typing import Optional

from pallas_kernels._checks import check_array, check_layer
from pallas_kernels._errors import KernelInputError


@dataclasses.dataclass(frozen=True)
class PagedPrefillDims:
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

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.page_rows


def validate(op, q, pool, layer, token_row, positions, k_pages, v_pages, sm_scale, sliding_window) -> PagedPrefillDims:
    check_array(op, "q", q, ndim=3, kind="float")
    T, Nq, D = q.shape
    check_array(op, "pool", pool, ndim=4, kind="float")
    L, P, R, W = pool.shape
    if W % D:
        raise KernelInputError(f"{op}: pool width W = {W} must be num_kv_heads * head_dim, not a multiple of D = {D}")
    Nkv = W // D
    if Nq % Nkv:
        raise KernelInputError(f"{op}: {Nq} query heads are not a multiple of the pool's {Nkv} KV heads (W // D)")
    check_array(op, "token_row", token_row, ndim=1, kind="int", shape=(T,))
    check_array(op, "positions", positions, ndim=1, kind="int", shape=(T,))
    check_array(op, "k_pages", k_pages, ndim=2, kind="int")
    check_array(op, "v_pages", v_pages, ndim=2, kind="int", shape=k_pages.shape)
    check_layer(op, layer, L)
    if not isinstance(sm_scale, (int, float)) or not sm_scale > 0:
        raise KernelInputError(f"{op}: sm_scale must be a positive Python float, got {sm_scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise KernelInputError(f"{op}: sliding_window must be None or a positive int, got {sliding_window!r}")
    if q.dtype != pool.dtype:
        raise KernelInputError(f"{op}: q dtype {q.dtype} must match the pool dtype {pool.dtype}")
    rows, nb = k_pages.shape
    return PagedPrefillDims(T, Nq, D, Nkv, L, P, R, rows, nb, float(sm_scale), sliding_window)
