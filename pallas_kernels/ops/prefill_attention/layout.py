"""Static sizes and input checks of `prefill_attention`."""

from __future__ import annotations

import dataclasses
from typing import Optional

from pallas_kernels._checks import check_array
from pallas_kernels._errors import KernelInputError


@dataclasses.dataclass(frozen=True)
class PrefillAttentionDims:
    num_tokens: int  # T
    num_q_heads: int  # Nq
    num_kv_heads: int  # Nkv
    head_dim: int  # D
    sm_scale: float
    sliding_window: Optional[int]

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


def validate(op, q, k, v, segment_ids, positions, sm_scale, sliding_window) -> PrefillAttentionDims:
    check_array(op, "q", q, ndim=3, kind="float")
    T, Nq, D = q.shape
    check_array(op, "k", k, ndim=3, kind="float", shape=(T, None, D))
    Nkv = k.shape[1]
    check_array(op, "v", v, ndim=3, kind="float", shape=k.shape)
    if Nq % Nkv:
        raise KernelInputError(f"{op}: {Nq} query heads are not a multiple of {Nkv} KV heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise KernelInputError(f"{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_array(op, "segment_ids", segment_ids, ndim=1, kind="int", shape=(T,))
    check_array(op, "positions", positions, ndim=1, kind="int", shape=(T,))
    if not isinstance(sm_scale, (int, float)) or not sm_scale > 0:
        raise KernelInputError(f"{op}: sm_scale must be a positive Python float, got {sm_scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise KernelInputError(f"{op}: sliding_window must be None or a positive int, got {sliding_window!r}")
    return PrefillAttentionDims(T, Nq, Nkv, D, float(sm_scale), sliding_window)
