"""prefill_attention on every backend against a per-token, per-head softmax loop."""

import zlib

import jax
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.ops.prefill_attention import layout, pallas_triton
from pallas_kernels.testing import TOLERANCE, np_dtype, relative_error


def _packed(lengths, starts):
    """segment ids and positions of sequences packed back to back; segment -1 = padding, id 7 skipped."""
    seg, pos = [], []
    for sid, (n, p0) in enumerate(zip(lengths, starts)):
        sid = -1 if p0 is None else (sid if sid < 7 else sid + 1)
        seg += [sid] * n
        pos += list(range(p0 or 0, (p0 or 0) + n))
    return np.asarray(seg, np.int32), np.asarray(pos, np.int32)


def _numpy_reference(q, k, v, seg, pos, sm_scale, window):
    T, nq, d = q.shape
    g = nq // k.shape[1]
    q, k, v = (np.asarray(a).astype(np.float64) for a in (q, k, v))
    out = np.zeros((T, nq, d))
    for i in range(T):
        keys = (seg == seg[i]) & (seg[i] >= 0) & (pos <= pos[i])
        if window is not None:
            keys &= pos > pos[i] - window
        if not keys.any():
            continue
        for h in range(nq):
            s = k[keys, h // g] @ q[i, h] * sm_scale
            p = np.exp(s - s.max())
            out[i, h] = p @ v[keys, h // g] / p.sum()
    return out


# (name, sequence lengths, first positions (None = padding), Nq, Nkv, D, window, permute tokens)
CASES = [
    # Several sequences across 64-token blocks, one a continuation (positions from 40), padding runs.
    ("packed_gqa2", [3, 70, 1, 50, 9], [None, 0, 0, 40, None], 4, 2, 16, None, False),
    ("window_mha", [20, 90, 33], [0, 0, 5], 2, 2, 32, 24, False),
    # Tokens of each sequence scattered over the pack: every key block must be considered.
    ("scattered_gqa4", [30, 40, 2], [0, 3, None], 4, 1, 16, None, True),
]


# bfloat16 runs in the full suite (the quick subset reads bf16 in test_pool_storage.py).
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
# The quick subset runs two cases (packed sequences, a window); the full suite, all.
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=() if c[0] in ('packed_gqa2', 'window_mha') else pytest.mark.slow)
                                  for c in CASES])
def test_prefill_attention_matches_dense_loop(implementation, dtype, case):
    name, lengths, starts, nq, nkv, d, window, permute = case
    rng = np.random.default_rng(zlib.crc32(f"{name}/{dtype}".encode()))
    seg, pos = _packed(lengths, starts)
    if permute:
        order = rng.permutation(len(seg))
        seg, pos = seg[order], pos[order]
    T = len(seg)
    dt = np_dtype(dtype)
    q = rng.standard_normal((T, nq, d)).astype(dt)
    k = rng.standard_normal((T, nkv, d)).astype(dt)
    v = rng.standard_normal((T, nkv, d)).astype(dt)
    sm_scale = d ** -0.5
    fn = jax.jit(pk.prefill_attention, static_argnames=("sm_scale", "sliding_window", "implementation"))
    out = fn(q, k, v, seg, pos, sm_scale=sm_scale, sliding_window=window, implementation=implementation)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = relative_error(out, _numpy_reference(q, k, v, seg, pos, sm_scale, window))
    assert err < TOLERANCE[dtype], f"{name}/{dtype}: relative error {err:.2e}"
    np.testing.assert_array_equal(np.asarray(out, np.float32)[seg < 0], 0.0)


def test_small_blocks_skip_only_empty_blocks():
    """16-token blocks over a pack with a window: many blocks skipped, result still exact."""
    rng = np.random.default_rng(5)
    seg, pos = _packed([37, 5, 60], [0, 0, 100])
    q = rng.standard_normal((len(seg), 2, 16)).astype(np.float32)
    k = rng.standard_normal((len(seg), 1, 16)).astype(np.float32)
    v = rng.standard_normal((len(seg), 1, 16)).astype(np.float32)
    for window in (None, 10):
        dims = layout.validate("test", q, k, v, seg, pos, 0.25, window)
        out = pallas_triton.prefill_attention_pallas(q, k, v, seg, pos, dims=dims, interpret=True, block=16)
        assert relative_error(out, _numpy_reference(q, k, v, seg, pos, 0.25, window)) < 1e-5


def test_prefill_attention_rejects_bad_shapes():
    q = np.zeros((4, 3, 16), np.float32)
    k = np.zeros((4, 2, 16), np.float32)
    seg = np.zeros(4, np.int32)
    with pytest.raises(pk.KernelInputError, match="not a multiple"):
        pk.prefill_attention(q, k, k, seg, seg, sm_scale=0.25)
    with pytest.raises(pk.KernelInputError, match="positions"):
        pk.prefill_attention(q[:, :2], k, k, seg, seg[:3], sm_scale=0.25)
    with pytest.raises(pk.KernelInputError, match="one dtype"):
        pk.prefill_attention(q[:, :2], k.astype(np.float16), k, seg, seg, sm_scale=0.25)


def test_block_ranges_of_contiguous_packs_are_tight():
    seg, pos = _packed([16, 16, 20], [0, 0, 0])  # three sequences, 16-token blocks
    _, _, summary = jax.jit(pallas_triton.block_ranges, static_argnums=2)(seg, pos, 16)
    kb_lo, kb_hi = np.asarray(summary)[:, 0], np.asarray(summary)[:, 1]
    np.testing.assert_array_equal(kb_lo, [0, 1, 2, 2])
    np.testing.assert_array_equal(kb_hi, [1, 2, 4, 4])
