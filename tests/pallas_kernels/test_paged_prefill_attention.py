"""paged_prefill_attention on every backend against dense per-token, per-head softmax loops."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.ops.paged_prefill_attention import layout, pallas_triton
from pallas_kernels.testing import TOLERANCE, kv_page_tables, np_dtype, relative_error

R = 16


def _make(dtype, seed, lengths, chunks, num_blocks, nq, nkv, d, num_pages=96, num_layers=2, align=1):
    """Requests with ``lengths`` tokens of K/V in a NaN-poisoned pool (permuted pages); the queries are
    ``chunks`` = [(request, first position, count)] laid out one after another, each starting at a multiple
    of ``align`` (the gaps are padding tokens, row -1)."""
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
    rows, pos = [], []
    for b, start, count in chunks:
        while len(rows) % align:
            rows.append(-1)
            pos.append(0)
        rows += [b] * count
        pos += list(range(start, start + count))
    T = len(rows)
    q = rng.standard_normal((T, nq, d)).astype(dt)
    return (q, pool.astype(dt), layer, np.asarray(rows, np.int32), np.asarray(pos, np.int32), k_pages, v_pages,
            k, v)


def _numpy_reference(q, rows, pos, k, v, sm_scale, window):
    T, nq, d = q.shape
    nkv = k.shape[2]
    g = nq // nkv
    out = np.zeros((T, nq, d))
    for t in range(T):
        b, p = rows[t], pos[t]
        if b < 0:
            continue
        keys = [j for j in range(p + 1) if window is None or j > p - window]
        for h in range(nq):
            kh = h // g
            s = np.array([q[t, h].astype(np.float64) @ k[b, j, kh] for j in keys]) * sm_scale
            e = np.exp(s - s.max())
            out[t, h] = (e[:, None] * v[b, keys, kh]).sum(0) / e.sum()
    return out


# (name, request lengths, chunks [(request, first position, count)], NB, Nq, Nkv, D, window, align)
CASES = [
    ("first_chunks_mha", [20, 7], [(0, 0, 20), (1, 0, 7)], 2, 2, 2, 16, None, 32),
    ("continued_chunks_gqa2", [50, 33, 16], [(0, 18, 32), (1, 30, 3), (2, 0, 16)], 4, 4, 2, 32, None, 32),
    ("one_token_gqa4", [45], [(0, 44, 1)], 3, 8, 2, 16, None, 32),
    ("window", [70, 9], [(0, 40, 30), (1, 0, 9)], 5, 4, 1, 32, 20, 32),
    ("unaligned_requests_share_blocks", [40, 21, 5], [(0, 10, 30), (1, 0, 21), (2, 2, 3)], 3, 4, 2, 16, None, 1),
]


# bfloat16 runs in the full suite (the quick subset reads bf16 in test_pool_storage.py).
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
# The quick subset runs three cases (continued chunks, a window, requests sharing blocks); the full suite, all.
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=() if c[0] in ('continued_chunks_gqa2', 'window', 'unaligned_requests_share_blocks') else pytest.mark.slow)
                                  for c in CASES])
def test_paged_prefill_attention_matches_dense_loops(implementation, dtype, case):
    name, lengths, chunks, nb, nq, nkv, d, window, align = case
    q, pool, layer, rows, pos, kp, vp, k, v = _make(dtype, zlib.crc32(f"{name}/{dtype}".encode()), lengths, chunks,
                                                    nb, nq, nkv, d, align=align)
    sm_scale = d ** -0.5
    fn = jax.jit(pk.paged_prefill_attention, static_argnames=("sm_scale", "sliding_window", "implementation"))
    out = fn(jnp.asarray(q), jnp.asarray(pool), jnp.int32(layer), rows, pos, kp, vp, sm_scale=sm_scale,
             sliding_window=window, implementation=implementation)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = _numpy_reference(q, rows, pos, k, v, sm_scale, window)
    err = relative_error(out, ref)
    assert err < TOLERANCE[dtype], f"{name}/{dtype}: relative error {err:.2e}"
    np.testing.assert_array_equal(np.asarray(out, np.float32)[rows < 0], 0.0)


def test_small_blocks_visit_many_key_blocks():
    """BQ = BT = 16: queries spanning several key blocks, with a request change inside no block."""
    q, pool, layer, rows, pos, kp, vp, k, v = _make("float32", 5, [64, 40], [(0, 20, 44), (1, 0, 40)], 4, 4, 2, 16,
                                                    align=16)
    dims = layout.validate("test", q, pool, layer, rows, pos, kp, vp, 0.25, None)
    out = pallas_triton.paged_prefill_attention_pallas(q, pool, layer, rows, pos, kp, vp, dims=dims, interpret=True,
                                                       block_q=16, block_tokens=16)
    assert relative_error(out, _numpy_reference(q, rows, pos, k, v, 0.25, None)) < 1e-5


def test_paged_prefill_attention_rejects_bad_shapes():
    q = np.zeros((3, 6, 16), np.float32)
    pool = np.zeros((1, 8, R, 64), np.float32)  # 4 KV heads: 6 query heads do not group
    kp = np.zeros((2, 2), np.int32)
    rows = np.zeros(3, np.int32)
    with pytest.raises(pk.KernelInputError, match="multiple of the pool's 4 KV heads"):
        pk.paged_prefill_attention(q, pool, 0, rows, rows, kp, kp, sm_scale=0.25)
    with pytest.raises(pk.KernelInputError, match="positions"):
        pk.paged_prefill_attention(q[:, :4], pool, 0, rows, rows[:2], kp, kp, sm_scale=0.25)
    with pytest.raises(pk.KernelInputError, match="v_pages"):
        pk.paged_prefill_attention(q[:, :4], pool, 0, rows, rows, kp, kp[:1], sm_scale=0.25)
