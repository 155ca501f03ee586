"""Which Pallas kernels a model's shapes rule out, known before any step runs.

Each op's kernel states its own limits (`pallas_triton.unsupported_reason(dims)`); this module asks every op
with the sizes a model and its page pool fix, so an engine can reject (or route to XLA) an op when it is
built instead of failing inside its first prefill.
"""

from __future__ import annotations

from pallas_kernels.ops.lora_decode import pallas_triton as _lora_decode
from pallas_kernels.ops.lora_decode import tiles_triton as _lora_tiles
from pallas_kernels.ops.lora_layout import LoraDims
from pallas_kernels.ops.lora_prefill import pallas_triton as _lora_prefill
from pallas_kernels.ops.paged_decode_attention import pallas_triton as _paged
from pallas_kernels.ops.paged_decode_attention.layout import PagedAttentionDims
from pallas_kernels.ops.paged_prefill_attention import pallas_triton as _paged_prefill
from pallas_kernels.ops.paged_prefill_attention.layout import PagedPrefillDims
from pallas_kernels.ops.prefill_attention import pallas_triton as _prefill
from pallas_kernels.ops.prefill_attention.layout import PrefillAttentionDims

OPS = ("lora_decode", "lora_prefill", "paged_decode_attention", "paged_prefill_attention", "prefill_attention",
       "write_kv")


def unsupported_ops(*, head_dim: int, num_q_heads: int, num_kv_heads: int, page_rows: int,
                    page_width: int | None = None, tensor_parallel: int = 1) -> dict[str, str]:
    """{op: why its Pallas kernel cannot take this model} for every op in `OPS` that cannot; {} if all can.

    Args:
      head_dim, num_q_heads, num_kv_heads: the model's attention shape (whole model, before sharding).
      page_rows: rows per page of the unified pool (R).
      page_width: the pool's width W (default num_kv_heads * head_dim, the engine's layout).
      tensor_parallel: devices the heads and the pool width are split over; the kernels see 1/tp of them.
    The reasons are the kernels' own messages, so they name the limit (e.g. "head_dim must be a power of
    two >= 16, got 8"). Sizes a kernel's public checks reject for every backend (W not a multiple of
    head_dim, query heads not a multiple of KV heads) are configuration errors, not kernel limits, and are
    not reported here.
    """
    for name, v in (("head_dim", head_dim), ("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads),
                    ("page_rows", page_rows), ("tensor_parallel", tensor_parallel)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"unsupported_ops: {name} must be a positive int, got {v!r}")
    width = (num_kv_heads * head_dim if page_width is None else page_width) // tensor_parallel
    nq, nkv = max(1, num_q_heads // tensor_parallel), max(1, num_kv_heads // tensor_parallel)
    # Only the fields the kernels' limits read matter; the rest take any valid value.
    lora = LoraDims(num_tokens=1, d_in=width, out_sizes=(width,), num_layers=1, num_pages=1, page_rows=page_rows,
                    width=width, num_slots=1, in_chunks=1, out_chunks_max=1, rank_blocks=1)
    paged = PagedAttentionDims(batch=1, num_q_heads=nq, head_dim=head_dim, num_kv_heads=nkv, num_layers=1,
                               num_pages=1, page_rows=page_rows, num_blocks=1, sm_scale=1.0, sliding_window=None)
    paged_prefill = PagedPrefillDims(num_tokens=1, num_q_heads=nq, head_dim=head_dim, num_kv_heads=nkv, num_layers=1,
                                     num_pages=1, page_rows=page_rows, num_rows=1, num_blocks=1, sm_scale=1.0,
                                     sliding_window=None)
    prefill = PrefillAttentionDims(num_tokens=1, num_q_heads=nq, num_kv_heads=nkv, head_dim=head_dim, sm_scale=1.0,
                                   sliding_window=None)
    reasons = {
        "lora_decode": _lora_decode.unsupported_reason(lora),
        "lora_prefill": _lora_prefill.unsupported_reason(lora),
        "paged_decode_attention": _paged.unsupported_reason(paged),
        "paged_prefill_attention": _paged_prefill.unsupported_reason(paged_prefill),
        "prefill_attention": _prefill.unsupported_reason(prefill),
        "write_kv": None,  # copies rows of any width and page size
    }
    return {op: why for op, why in reasons.items() if why is not None}


def lora_tiles_unsupported(*, page_rows: int, page_width: int, tensor_parallel: int = 1) -> str | None:
    """Why MBGMV's tile kernels (`lora_decode(..., grouping="tiles")`) cannot take a pool of this page size, or
    None. Where they cannot, that grouping runs the per-token kernels, so an engine need not compile programs
    for it. page_width: the whole pool's width W (each of ``tensor_parallel`` devices holds 1/tp of it)."""
    width = page_width // tensor_parallel
    dims = LoraDims(num_tokens=1, d_in=width, out_sizes=(width,), num_layers=1, num_pages=1, page_rows=page_rows,
                    width=width, num_slots=1, in_chunks=1, out_chunks_max=1, rank_blocks=1)
    return _lora_decode.unsupported_reason(dims) or _lora_tiles.unsupported_reason(dims)
