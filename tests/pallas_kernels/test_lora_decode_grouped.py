"""MBGMV's grouped kernels (tokens sharing an adapter read it once per 16-token tile) against a dense float64
loop over tokens, and the step plan they run on.

Every check draws fresh random inputs (the seed is in the failure message); pools are NaN-poisoned wherever
a kernel must not read (see `pallas_kernels.testing`), y is random (the op adds to it), and interpret mode
fills the kernels' intermediate buffer with NaN, so a read of anything the shrink did not write shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.ops.lora_decode import pallas_triton
from pallas_kernels.ops.lora_layout import sanitize_slots, validate_lora_args
from pallas_kernels.testing import TOLERANCE, make_lora_case, np_dtype, relative_error

TM = pallas_triton.GROUP_TOKENS


def _slots(kind, rng, T, S):
    """Slot table of one check: which tokens share an adapter, in what order."""
    if kind == "one_adapter":  # every token on one adapter: tiles of 16 plus a partial one
        return np.full(T, S - 1, np.int32)
    if kind == "straddling":  # unsorted runs whose tiles straddle 16-token boundaries, -1 rows between
        sizes = [5, 20, 3, 12]
        s = np.concatenate([np.full(n, i % S, np.int32) for i, n in enumerate(sizes)])
        s = np.concatenate([np.full(T - len(s), -1, np.int32), s]) if T > len(s) else s[:T]
        return s
    if kind == "mixed":  # groups, lone tokens, no-adapter rows and out-of-range slots interleaved at random
        s = rng.choice(np.array([0, 0, 0, 0, 1 % S, 1 % S, -1, S, 2 % S, 3 % S], np.int32), T)
        s[rng.integers(0, T)] = S + 3  # out of range: no adapter
        return s.astype(np.int32)
    if kind == "pairs":  # runs of 2-3 tokens: tiles with fewer programs than pieces of work (several rounds)
        sizes = np.resize([2, 3, 1, 2, 3], T)
        s = np.concatenate([np.full(n, i % S, np.int32) for i, n in enumerate(sizes)])[:T]
        return s
    if kind == "distinct":  # every token alone on its adapter: the per-token path only
        return rng.permutation(T).astype(np.int32) % S
    raise ValueError(kind)


# (name, T, d_in, out_sizes, W, S, rank choices, slot kind)
CASES = [
    ("one_token", 1, 64, (64, 32, 32), 32, 2, (16,), "one_adapter"),
    ("one_adapter_37", 37, 80, (64, 32, 32), 32, 3, (0, 1, 16, 17, 32), "one_adapter"),
    ("straddling_40", 40, 64, (48, 16), 16, 3, (3, 16, 33, 48), "straddling"),
    ("rank_one", 20, 32, (32,), 32, 2, (1,), "mixed"),
    ("mixed_33", 33, 80, (64, 32, 32), 32, 4, (0, 1, 5, 16, 32), "mixed"),
    ("small_batch_8", 8, 64, (64, 32, 32), 32, 2, (16,), "one_adapter"),
    ("distinct_12", 12, 64, (32, 32), 32, 12, (8, 16), "distinct"),
    ("pairs_wide", 15, 64, (128, 64), 64, 8, (1, 16, 32), "pairs"),
]
KNOB_CASES = [CASES[1], CASES[4], CASES[-1]]


def _check(case, dtype, grouping, reference, **knobs):
    name, T, d_in, out_sizes, W, S, rank_choices, kind = case
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    L, R = 2, 16
    ranks = rng.choice(rank_choices, size=(S, L, len(out_sizes))).astype(np.int32)
    lc = make_lora_case(rng, num_layers=L, num_pages=800, page_rows=R, width=W, d_in=d_in, out_sizes=out_sizes,
                        ranks=ranks, dtype=dtype)
    token_slot = _slots(kind, rng, T, S)
    dt = np_dtype(dtype)
    x = rng.standard_normal((T, d_in)).astype(dt)
    y = rng.standard_normal((T, sum(out_sizes))).astype(dt)
    layer = 1
    args = (jnp.asarray(y), jnp.asarray(x), jnp.asarray(lc.pool), jnp.int32(layer), lc.a_pages, lc.b_pages,
            lc.ranks, lc.scales)
    if knobs:
        dims = validate_lora_args("t", *args, token_slot, out_sizes)
        out = pallas_triton.lora_decode_pallas(*args, sanitize_slots(jnp.asarray(token_slot), dims), dims=dims,
                                               interpret=pk._backend.interpret_mode(), grouping=grouping, **knobs)
    else:
        fn = jax.jit(pk.lora_decode, static_argnames=("out_sizes", "implementation", "grouping"))
        out = fn(*args, token_slot, out_sizes=out_sizes, implementation="pallas", grouping=grouping)
    assert out.shape == y.shape and out.dtype == y.dtype
    ref = reference(y, x, lc, layer, token_slot)
    err = relative_error(out, ref, base=y)
    assert err < TOLERANCE[dtype], f"{name}/{dtype}/{grouping} seed {seed}: relative error {err:.2e}"
    skip = (token_slot < 0) | (token_slot >= S)
    np.testing.assert_array_equal(np.asarray(out)[skip], y[skip], err_msg=f"seed {seed}")


# The quick subset runs the kernel's own grouping and the run-length plan on one case (groups mixed with lone
# and no-adapter tokens; the sorted plan runs there through test_kernel_grouping_hands_large_batches_to_the_
# sorted_plan); the full suite runs every case with every plan.
KERNEL_CASES_QUICK = ("mixed_33",)
PLAN_CASES_QUICK = {"sort": (), "runs": ("mixed_33",)}


@pytest.mark.parametrize("case, grouping", [
    pytest.param(c, g, id=f"{c[0]}-{g}",
                 marks=() if c[0] in (KERNEL_CASES_QUICK if g == "kernel" else PLAN_CASES_QUICK[g])
                 else pytest.mark.slow)
    for c in CASES for g in ("kernel", "sort", "runs")])
def test_grouped_kernels_match_dense_loop(case, grouping, lora_numpy_reference):
    _check(case, "float32", grouping, lora_numpy_reference)


@pytest.mark.parametrize("case", [pytest.param(CASES[1], id=CASES[1][0], marks=pytest.mark.slow),
                                  pytest.param(CASES[4], id=CASES[4][0], marks=pytest.mark.slow)])
def test_grouped_kernels_match_dense_loop_bf16(case, lora_numpy_reference):
    """bf16: the group path rounds v to the pool dtype before its tl.dot (as MBGMM does)."""
    _check(case, "bfloat16", "kernel", lora_numpy_reference)


@pytest.mark.parametrize("knobs", [
    pytest.param(dict(group_splits=1, single_splits=1), id="splits1", marks=pytest.mark.slow),
    pytest.param(dict(group_splits=16, single_splits=4), id="gs16_ss4", marks=pytest.mark.slow),
    pytest.param(dict(group_splits=2, single_splits=2, block_k=16, block_n=16), id="gs2_ss2_blocks16",
                 marks=pytest.mark.slow),
    pytest.param(dict(column_masks=True, num_stages=3), id="column_masks_stages3", marks=pytest.mark.slow)])
# Every knob and case runs in the full suite (each an interpret-mode compile of 2-7 s on two cores).
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=() if i == 0 else pytest.mark.slow)
                                  for i, c in enumerate(KNOB_CASES)])
def test_grouped_kernel_knobs_match_dense_loop(case, knobs, lora_numpy_reference):
    """Splits of d_in over 1-16 parts (parts past d_in included: d_in = 80 is 3 blocks of 32; a 5-token tile
    takes 16 parts in rounds of 5 programs), smaller blocks (several per page chunk, spread over a tile's
    programs), per-column masks."""
    _check(case, "float32", "kernel", lora_numpy_reference, **knobs)


def test_page_rows_below_16_fall_back_to_the_per_token_kernels(lora_numpy_reference):
    """tl.dot needs 16 rank rows; a pool of 8-row pages takes the per-token path and stays correct."""
    rng = np.random.default_rng(0)
    R, W, d_in, outs, S, T = 8, 32, 64, (32, 32), 2, 20
    dims = validate_lora_args("t", np.zeros((T, 64), np.float32), np.zeros((T, d_in), np.float32),
                              np.zeros((1, 4, R, W), np.float32), 0, np.zeros((S, 2, 2, 2), np.int32),
                              np.zeros((S, 2, 1, 2), np.int32), np.zeros((S, 1, 2), np.int32),
                              np.zeros((S, 1, 2), np.float32), np.zeros(T, np.int32), outs)
    assert pallas_triton.grouped_unsupported_reason(dims, 32, 32) is not None
    ranks = rng.choice([3, 8, 16], size=(S, 2, 2)).astype(np.int32)
    lc = make_lora_case(rng, num_layers=2, num_pages=200, page_rows=R, width=W, d_in=d_in, out_sizes=outs,
                        ranks=ranks)
    slot = np.zeros(T, np.int32)
    x = rng.standard_normal((T, d_in)).astype(np.float32)
    y = rng.standard_normal((T, 64)).astype(np.float32)
    out = pk.lora_decode(y, x, lc.pool, 1, lc.a_pages, lc.b_pages, lc.ranks, lc.scales, slot, out_sizes=outs,
                         implementation="pallas")
    err = relative_error(out, lora_numpy_reference(y, x, lc, 1, slot), base=y)
    assert err < TOLERANCE["float32"], err


@pytest.mark.parametrize("sort", [True, False])
def test_plan_tiles_cover_every_token_once_in_groups_of_one_slot(sort):
    """decode_plan against a plain Python walk: each token in exactly one tile, tiles <= 16 tokens of one key,
    no tile crossing a 16-position boundary, and (sorted) one key's tokens consecutive."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    T, S = 75, 5
    slot = rng.integers(-1, S, T).astype(np.int32)
    slot[10:40] = 2
    dims = validate_lora_args("t", np.zeros((T, 16), np.float32), np.zeros((T, 16), np.float32),
                              np.zeros((1, 4, 16, 16), np.float32), 0, np.zeros((S, 1, 1, 1), np.int32),
                              np.zeros((S, 1, 1, 1), np.int32), np.zeros((S, 1, 1), np.int32),
                              np.zeros((S, 1, 1), np.float32), slot, (16,))
    order, key, start, tile_len = (np.asarray(a) for a in pallas_triton.decode_plan(jnp.asarray(slot), dims,
                                                                                    tm=TM, sort=sort))
    assert order.shape == (T + TM,) and key.shape == start.shape == tile_len.shape == (T,)
    perm = order[:T]
    assert np.all(order[T:] == T)  # padding past the last token
    assert sorted(perm.tolist()) == list(range(T))
    want_key = np.where(slot >= 0, slot, S)
    np.testing.assert_array_equal(key, want_key[perm])
    if sort:
        assert np.all(np.diff(key) >= 0)
        np.testing.assert_array_equal(perm, np.argsort(want_key, kind="stable"))
    else:
        np.testing.assert_array_equal(perm, np.arange(T))
    covered = np.zeros(T, int)
    i = 0
    while i < T:  # walk tile by tile: every position is covered by the tile that starts at or before it
        n = tile_len[i]
        assert 1 <= n <= TM and (i % TM) + n <= TM
        assert np.all(key[i:i + n] == key[i])
        covered[i:i + n] += 1
        # Every position knows its tile's first position and size.
        assert np.all(start[i:i + n] == i) and np.all(tile_len[i:i + n] == n)
        # Maximal: a tile ends only at a key change, a 16-position boundary or the end.
        assert i + n == T or (i + n) % TM == 0 or key[i + n] != key[i]
        i += n
    assert np.all(covered == 1)


def test_grouping_knob_is_checked():
    rng = np.random.default_rng(0)
    lc = make_lora_case(rng, num_layers=1, num_pages=64, page_rows=16, width=32, d_in=64, out_sizes=(32,),
                        ranks=np.full((2, 1, 1), 8), poison=False)
    args = (np.zeros((3, 32), np.float32), np.zeros((3, 64), np.float32), lc.pool, 0, lc.a_pages, lc.b_pages,
            lc.ranks, lc.scales, np.zeros(3, np.int32))
    with pytest.raises(pk.KernelInputError, match="grouping"):
        pk.lora_decode(*args, out_sizes=(32,), grouping="bogus")


def test_kernel_grouping_hands_large_batches_to_the_sorted_plan(monkeypatch, lora_numpy_reference):
    """Above KERNEL_PLAN_MAX_TOKENS the in-kernel plan (a [16, T] select per program) gives way to XLA's sort."""
    calls = []
    plan = pallas_triton.decode_plan
    monkeypatch.setattr(pallas_triton, "KERNEL_PLAN_MAX_TOKENS", 16)
    monkeypatch.setattr(pallas_triton, "decode_plan", lambda *a, **k: calls.append(k) or plan(*a, **k))
    _check(("above_max", 19, 48, (32,), 16, 2, (16,), "mixed"), "float32", "kernel", lora_numpy_reference)
    assert calls and calls[0]["sort"] is True
