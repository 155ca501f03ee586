"""paged_decode_attention on every backend against dense per-request, per-head softmax loops."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.ops.paged_decode_attention import layout, pallas_triton
from pallas_kernels.testing import TOLERANCE, kv_page_tables, np_dtype, relative_error

R = 16


def _make(dtype, seed, lengths, num_blocks, nq, nkv, d, num_pages=96, num_layers=2):
    """Dense K/V per request written into a NaN-poisoned pool through permuted page tables."""
    rng = np.random.default_rng(seed)
    dt = np_dtype(dtype)
    B = len(lengths)
    k_pages, v_pages = kv_page_tables(rng, lengths, num_blocks, num_pages, R)
    pool = np.full((num_layers, num_pages, R, nkv * d), np.nan, np.float32)
    k = rng.standard_normal((B, num_blocks * R, nkv, d)).astype(dt).astype(np.float64)
    v = rng.standard_normal((B, num_blocks * R, nkv, d)).astype(dt).astype(np.float64)
    layer = num_layers - 1
    for b, n in enumerate(lengths):
        for j in range(n):
            pool[layer, k_pages[b, j // R], j % R] = k[b, j].reshape(-1)
            pool[layer, v_pages[b, j // R], j % R] = v[b, j].reshape(-1)
    q = rng.standard_normal((B, nq, d)).astype(dt)
    return q, pool.astype(dt), layer, k_pages, v_pages, np.asarray(lengths, np.int32), k, v


def _numpy_reference(q, k, v, lengths, sm_scale, window):
    B, nq, d = q.shape
    nkv = k.shape[2]
    g = nq // nkv
    out = np.zeros((B, nq, d))
    for b in range(B):
        n = lengths[b]
        pos = n - 1
        keys = [j for j in range(n) if window is None or j > pos - window]
        if not keys:
            continue
        for h in range(nq):
            kh = h // g
            s = np.array([q[b, h].astype(np.float64) @ k[b, j, kh] for j in keys]) * sm_scale
            p = np.exp(s - s.max())
            out[b, h] = (p[:, None] * v[b, keys, kh]).sum(0) / p.sum()
    return out


# (name, lengths, NB, Nq, Nkv, D, window): GQA groups 1/2/4, lengths 0/1/multiple of R/ragged/full table.
CASES = [
    ("mha", [1, 32, 45, 0], 4, 2, 2, 16, None),
    ("gqa2_window", [70, 16, 5], 5, 4, 2, 32, 20),
    ("gqa4", [64, 33], 4, 8, 2, 16, None),
    ("gqa4_window_wider_than_len", [9, 50], 4, 4, 1, 32, 64),
]


# bfloat16 runs in the full suite (the quick subset reads bf16 in test_pool_storage.py).
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
# The quick subset runs two cases (MHA, GQA with a window); the full suite, all.
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=() if c[0] in ('mha', 'gqa2_window') else pytest.mark.slow)
                                  for c in CASES])
def test_paged_decode_attention_matches_dense_loops(implementation, dtype, case):
    name, lengths, nb, nq, nkv, d, window = case
    q, pool, layer, kp, vp, lens, k, v = _make(dtype, zlib.crc32(f"{name}/{dtype}".encode()), lengths, nb, nq, nkv, d)
    sm_scale = d ** -0.5
    fn = jax.jit(pk.paged_decode_attention, static_argnames=("sm_scale", "sliding_window", "implementation"))
    out = fn(
        jnp.asarray(q), jnp.asarray(pool), jnp.int32(layer), kp, vp, lens, sm_scale=sm_scale,
        sliding_window=window, implementation=implementation,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = _numpy_reference(q, k, v, lens, sm_scale, window)
    err = relative_error(out, ref)
    assert err < TOLERANCE[dtype], f"{name}/{dtype}: relative error {err:.2e}"
    np.testing.assert_array_equal(np.asarray(out, np.float32)[lens == 0], 0.0)


@pytest.mark.parametrize("window", [None, 24])
def test_split_page_table_merges_partial_softmaxes(window):
    """The split-K path (few requests): three spans of 16 tokens, some of them empty."""
    q, pool, layer, kp, vp, lens, k, v = _make("float32", 11, [40, 1, 0, 48], 3, 4, 2, 16)
    dims = layout.validate("test", q, pool, layer, kp, vp, lens, 0.25, window)
    out = pallas_triton.paged_decode_attention_pallas(
        q, pool, layer, kp, vp, lens, dims=dims, interpret=True, block_tokens=16, num_splits=3
    )
    assert relative_error(out, _numpy_reference(q, k, v, lens, 0.25, window)) < 1e-5


def test_paged_decode_attention_rejects_bad_shapes():
    q = np.zeros((2, 6, 16), np.float32)
    pool = np.zeros((1, 8, R, 64), np.float32)  # 4 KV heads: 6 query heads do not group
    kp = np.zeros((2, 2), np.int32)
    with pytest.raises(pk.KernelInputError, match="multiple of the pool's 4 KV heads"):
        pk.paged_decode_attention(q, pool, 0, kp, kp, np.ones(2, np.int32), sm_scale=0.25)
    with pytest.raises(pk.KernelInputError, match="lengths"):
        pk.paged_decode_attention(q[:, :4], pool, 0, kp, kp, np.ones(3, np.int32), sm_scale=0.25)
    with pytest.raises(pk.KernelInputError, match="sliding_window"):
        pk.paged_decode_attention(q[:, :4], pool, 0, kp, kp, np.ones(2, np.int32), sm_scale=0.25, sliding_window=0)
