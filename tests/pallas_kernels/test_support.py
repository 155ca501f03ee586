"""pallas_kernels.unsupported_ops: the ops a model's shapes rule out, with the reason each op itself gives."""

import re

import numpy as np
import pytest

import pallas_kernels as pk


def test_llama_shapes_are_supported_by_every_kernel():
    assert pk.unsupported_ops(head_dim=128, num_q_heads=32, num_kv_heads=8, page_rows=16) == {}
    assert pk.unsupported_ops(head_dim=64, num_q_heads=8, num_kv_heads=2, page_rows=16, tensor_parallel=2) == {}


def test_head_dim_8_rules_out_both_attention_kernels_and_names_the_limit():
    bad = pk.unsupported_ops(head_dim=8, num_q_heads=14, num_kv_heads=2, page_rows=16)
    assert set(bad) == {"paged_decode_attention", "paged_prefill_attention", "prefill_attention"}
    for why in bad.values():
        assert "head_dim must be a power of two >= 16, got 8" in why


def test_page_rows_and_width_limits_reach_the_lora_kernels():
    bad = pk.unsupported_ops(head_dim=16, num_q_heads=4, num_kv_heads=1, page_rows=12)
    assert {"lora_decode", "lora_prefill", "paged_decode_attention", "paged_prefill_attention"} <= set(bad)
    assert "page_rows" in bad["lora_decode"] and "12" in bad["lora_decode"]
    # Width 24 (not a multiple of 16) under tensor parallelism 1: the prefill LoRA kernel's tl.dot blocks.
    bad = pk.unsupported_ops(head_dim=16, num_q_heads=4, num_kv_heads=2, page_rows=16, page_width=24)
    assert set(bad) == {"lora_prefill"} and "multiple of 16" in bad["lora_prefill"]


def test_tensor_parallel_splits_the_width_the_kernels_see():
    # W = 2 * 16 = 32 on one device is fine; on 4 devices each holds 8 columns, below tl.dot's 16.
    assert "lora_prefill" not in pk.unsupported_ops(head_dim=16, num_q_heads=4, num_kv_heads=2, page_rows=16)
    bad = pk.unsupported_ops(head_dim=16, num_q_heads=4, num_kv_heads=2, page_rows=16, page_width=32,
                             tensor_parallel=4)
    assert "lora_prefill" in bad and "W = 8" in bad["lora_prefill"]


def test_reasons_match_what_the_ops_raise_when_forced_onto_pallas():
    """The reason reported up front is the one the op raises on its first call with implementation='pallas'."""
    D, nq, nkv, R = 8, 4, 2, 16
    bad = pk.unsupported_ops(head_dim=D, num_q_heads=nq, num_kv_heads=nkv, page_rows=R)
    T = 4
    q = np.zeros((T, nq, D), np.float32)
    kv = np.zeros((T, nkv, D), np.float32)
    seg = np.zeros(T, np.int32)
    with pytest.raises(pk.KernelInputError, match=re.escape(bad["prefill_attention"])):
        pk.prefill_attention(q, kv, kv, seg, np.arange(T, dtype=np.int32), sm_scale=1.0, implementation="pallas")
    pool = np.zeros((1, 4, R, nkv * D), np.float32)
    pages = np.zeros((T, 1), np.int32)
    with pytest.raises(pk.KernelInputError, match=re.escape(bad["paged_decode_attention"])):
        pk.paged_decode_attention(q, pool, 0, pages, pages, np.ones(T, np.int32), sm_scale=1.0,
                                  implementation="pallas")
    with pytest.raises(pk.KernelInputError, match=re.escape(bad["paged_prefill_attention"])):
        pk.paged_prefill_attention(q, pool, 0, np.zeros(T, np.int32), np.arange(T, dtype=np.int32), pages, pages,
                                   sm_scale=1.0, implementation="pallas")


def test_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="head_dim"):
        pk.unsupported_ops(head_dim=0, num_q_heads=4, num_kv_heads=2, page_rows=16)
