"""UnifiedPagePool: allocation invariants under a randomised stress, and the stated waste bound."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from slora_jax.memory.pool import ADAPTER, KV, PoolExhausted, PoolLayout, UnifiedPagePool


def test_alloc_free_counts_and_reserved_page():
    pool = UnifiedPagePool(PoolLayout(2, 10, 4, 8))
    assert pool.total_pages == 9  # page 0 is reserved
    a = pool.alloc(4, KV)
    b = pool.alloc(3, ADAPTER)
    assert 0 not in a and 0 not in b
    assert len(set(a) | set(b)) == 7
    assert (pool.free_pages, pool.kv_pages, pool.adapter_pages) == (2, 4, 3)
    with pytest.raises(PoolExhausted):
        pool.alloc(3, KV)
    pool.free(a, KV)
    with pytest.raises(RuntimeError):
        pool.free(b, KV)  # wrong kind
    with pytest.raises(RuntimeError):
        pool.free(a[:1], KV)  # double free
    pool.check_invariants()


def test_randomised_stress_thousands_of_operations():
    rng = np.random.default_rng(0)
    pool = UnifiedPagePool(PoolLayout(1, 257, 4, 4))
    held = []  # (pages, kind)
    for _ in range(5000):
        op = rng.integers(3)
        if op < 2:
            n = int(rng.integers(1, 12))
            kind = KV if rng.random() < 0.6 else ADAPTER
            if pool.can_alloc(n):
                held.append((pool.alloc(n, kind), kind))
            else:
                with pytest.raises(PoolExhausted):
                    pool.alloc(n, kind)
        elif held:
            pages, kind = held.pop(int(rng.integers(len(held))))
            pool.free(pages, kind)
        owned = np.concatenate([p for p, _ in held]) if held else np.zeros(0, np.int32)
        assert np.unique(owned).size == owned.size  # no page owned twice
    pool.check_invariants()
    for pages, kind in held:
        pool.free(pages, kind)
    pool.check_invariants()
    assert pool.free_pages == pool.total_pages and pool.kv_pages == 0 and pool.adapter_pages == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9)), max_size=80))
def test_property_free_plus_used_is_total(ops):
    pool = UnifiedPagePool(PoolLayout(1, 40, 2, 2))
    held = []
    for is_alloc, n in ops:
        if is_alloc and pool.can_alloc(n):
            held.append(pool.alloc(n, KV))
        elif held:
            pool.free(held.pop(0), KV)
        assert pool.free_pages + pool.kv_pages + pool.adapter_pages == pool.total_pages
    pool.check_invariants()


@pytest.mark.parametrize("d,W,r,R", [(4096, 1024, 16, 16), (11008, 4096, 8, 16), (14336, 1024, 64, 16),
                                     (896, 128, 3, 8)])
def test_adapter_waste_bound_from_docstring(d, W, r, R):
    layout = PoolLayout(1, 2, R, W)
    pages = layout.adapter_pages_for([(r, d, d)])
    stored = pages * R * W
    needed = 2 * r * d
    # Stated bound: < R padding rows of the rank and < W padding columns per (A or B) matrix.
    bound = 2 * ((math.ceil(r / R) * R) * (math.ceil(d / W) * W))
    assert stored == bound
    assert stored - needed <= 2 * ((R - 1) * math.ceil(d / W) * W + r * (W - 1))


def test_kv_pages_for_tokens():
    layout = PoolLayout(2, 8, 16, 32)
    assert layout.kv_pages_for(1) == 2
    assert layout.kv_pages_for(16) == 2
    assert layout.kv_pages_for(17) == 4
