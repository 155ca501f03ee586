"""MBGMV's tile kernels (grouping "tiles": a sorted plan, tiles of <= 16 tokens of one slot, tl.dot) against a dense
float64 loop over tokens; their plan; the host's choice between them and the per-token kernels.

The slot layouts and sizes are the grouped kernels' (`test_lora_decode_grouped`); every check draws fresh random
inputs (the seed is in the failure message), NaN-poisoned pools wherever a kernel must not read, and interpret
mode fills the kernels' partial-v buffer with NaN, so a read of anything the shrink did not write shows.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.ops.lora_decode import pallas_triton, tiles_triton
from pallas_kernels.ops.lora_layout import validate_lora_args
from pallas_kernels.testing import TOLERANCE, make_lora_case, np_dtype, relative_error
from tests.pallas_kernels.test_lora_decode_grouped import _slots

TM = tiles_triton.TILE_TOKENS

# (name, T, d_in, out_sizes, W, S, rank choices, slot kind). "ragged": d_in and the output widths are not multiples
# of the blocks (the expand reads its blocks from the table, every load masked by column); "max_rank": ranks up to
# four rank blocks of 16 rows.
CASES = [
    ("one_token", 1, 64, (64, 32, 32), 32, 2, (16,), "one_adapter"),
    ("one_adapter_37", 37, 80, (64, 32, 32), 32, 3, (0, 1, 16, 17, 32), "one_adapter"),
    ("mixed_33", 33, 80, (64, 32, 32), 32, 4, (0, 1, 5, 16, 32), "mixed"),
    ("straddling_40", 40, 64, (48, 16), 16, 3, (3, 16, 33, 48), "straddling"),
    ("ragged", 21, 72, (40, 24), 32, 3, (1, 7, 16), "pairs"),
    ("max_rank", 18, 64, (64,), 32, 2, (64,), "one_adapter"),
    ("distinct_12", 12, 64, (32, 32), 32, 12, (8, 16), "distinct"),
]
QUICK = ("mixed_33", "ragged")


def _run(case, dtype, reference, *, with_plan, layer=1, **knobs):
    name, T, d_in, out_sizes, W, S, rank_choices, kind = case
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    L = 2
    ranks = rng.choice(rank_choices, size=(S, L, len(out_sizes))).astype(np.int32)
    lc = make_lora_case(rng, num_layers=L, num_pages=800, page_rows=16, width=W, d_in=d_in, out_sizes=out_sizes,
                        ranks=ranks, dtype=dtype)
    token_slot = _slots(kind, rng, T, S)
    dt = np_dtype(dtype)
    x = rng.standard_normal((T, d_in)).astype(dt)
    y = rng.standard_normal((T, sum(out_sizes))).astype(dt)
    args = (jnp.asarray(y), jnp.asarray(x), jnp.asarray(lc.pool), jnp.int32(layer), lc.a_pages, lc.b_pages, lc.ranks,
            lc.scales)
    if knobs:  # the kernel itself, with knobs the public op does not take (slots as given: the plan checks them)
        dims = validate_lora_args("t", *args, token_slot, out_sizes)
        out = pallas_triton.lora_decode_pallas(*args, jnp.asarray(token_slot), dims=dims,
                                               interpret=pk._backend.interpret_mode(), grouping="tiles", **knobs)
    else:
        plan = pk.lora_decode_plan(jnp.asarray(token_slot), S) if with_plan else None
        out = pk.lora_decode(*args, token_slot, out_sizes=out_sizes, implementation="pallas", grouping="tiles",
                             plan=plan)
    assert out.shape == y.shape and out.dtype == y.dtype
    err = relative_error(out, reference(y, x, lc, int(np.clip(layer, 0, L - 1)), token_slot), base=y)
    assert err < TOLERANCE[dtype], f"{name}/{dtype} seed {seed}: relative error {err:.2e}"
    skip = (token_slot < 0) | (token_slot >= S)
    np.testing.assert_array_equal(np.asarray(out)[skip], y[skip], err_msg=f"seed {seed}")


# Every case with the plan passed in (the engine's call); the plan computed in the call on the quick cases.
@pytest.mark.parametrize("case, with_plan", [
    pytest.param(c, p, id=f"{'plan' if p else 'no_plan'}-{c[0]}", marks=() if c[0] in QUICK else pytest.mark.slow)
    for c in CASES for p in (True, False) if p or c[0] in QUICK])
def test_tile_kernels_match_dense_loop(case, with_plan, lora_numpy_reference):
    _run(case, "float32", lora_numpy_reference, with_plan=with_plan)


@pytest.mark.parametrize("case", [pytest.param(CASES[1], id=CASES[1][0]),
                                  pytest.param(CASES[4], id=CASES[4][0], marks=pytest.mark.slow)])
def test_tile_kernels_match_dense_loop_bf16(case, lora_numpy_reference):
    """bf16: v is rounded to the pool dtype before the expand's tl.dot (as MBGMM does)."""
    _run(case, "bfloat16", lora_numpy_reference, with_plan=True)


@pytest.mark.parametrize("knobs", [
    pytest.param(dict(k_splits=4), id="ks4_parts_past_d_in"),
    pytest.param(dict(k_splits=1, block_k=16, block_n=16), id="ks1_blocks16", marks=pytest.mark.slow),
    pytest.param(dict(k_splits=2, num_warps=8), id="ks2_warps8", marks=pytest.mark.slow)])
def test_tile_kernel_knobs_match_dense_loop(knobs, lora_numpy_reference):
    """d_in = 80 is 3 blocks of 32: 4 parts leave one part wholly past d_in (masked, no bytes); 16-column blocks
    put several blocks in a page chunk."""
    _run(CASES[2], "float32", lora_numpy_reference, with_plan=False, **knobs)


@pytest.mark.parametrize("layer", [7, -3], ids=["past_the_last", "negative"])
def test_tile_kernels_clip_a_traced_layer_out_of_range(layer, lora_numpy_reference):
    """The tile kernels clip the layer themselves: a traced 7 of 2 layers reads layer 1, -3 reads layer 0."""
    _run(CASES[2], "float32", lora_numpy_reference, with_plan=True, layer=layer)


def test_no_tokens():
    """T = 0: an empty plan, and the op returns y (with or without a plan)."""
    rng = np.random.default_rng(0)
    lc = make_lora_case(rng, num_layers=1, num_pages=64, page_rows=16, width=32, d_in=64, out_sizes=(32,),
                        ranks=np.full((2, 1, 1), 8), poison=False)
    slot = np.zeros(0, np.int32)
    plan = pk.lora_decode_plan(slot, 2)
    assert [a.shape for a in plan] == [(0,), (0,)]
    y = np.ones((0, 32), np.float32)
    for p in (plan, None):
        out = pk.lora_decode(y, np.zeros((0, 64), np.float32), lc.pool, 0, lc.a_pages, lc.b_pages, lc.ranks, lc.scales,
                             slot, out_sizes=(32,), implementation="pallas", grouping="tiles", plan=p)
        assert out.shape == (0, 32)


@pytest.mark.parametrize("sort", [True, False])
def test_plan_tiles_cover_every_token_once_in_tiles_of_one_slot(sort):
    """tile_plan against a plain walk: every token in exactly one tile (no-adapter tokens in tiles of slot -1), at
    most 16 tokens of one slot per tile, slots in order when sorted; empty tiles only past the used ones."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    T, S = 75, 5
    slot = rng.integers(-1, S + 2, T).astype(np.int32)  # ids >= S: no adapter
    slot[10:40] = 2
    rows, tslot = (np.asarray(a) for a in tiles_triton.tile_plan(jnp.asarray(slot), S, sort=sort))
    nt = tiles_triton.num_tiles(T, S, sort=sort)
    assert rows.shape == (nt * TM,) and tslot.shape == (nt,)
    rows = rows.reshape(nt, TM)
    want = np.where((slot >= 0) & (slot < S), slot, -1)
    seen = np.zeros(T, int)
    used = [(rows[i] < T).sum() for i in range(nt)]
    assert all(u == 0 for u in used[np.count_nonzero(used):])  # the used tiles come first
    for i in range(nt):
        members = rows[i][rows[i] < T]
        assert np.all(rows[i][len(members):] == T)  # a tile's tokens, then T
        assert len(members) <= TM
        assert np.all(want[members] == tslot[i]), (i, members, tslot[i])
        seen[members] += 1
    assert np.all(seen == 1)
    if sort:
        order = rows[rows < T]
        key = np.where(want >= 0, want, S)
        np.testing.assert_array_equal(order, np.argsort(key, kind="stable"))


def test_plan_and_grouping_are_checked():
    rng = np.random.default_rng(0)
    lc = make_lora_case(rng, num_layers=1, num_pages=64, page_rows=16, width=32, d_in=64, out_sizes=(32,),
                        ranks=np.full((2, 1, 1), 8), poison=False)
    slot = np.zeros(3, np.int32)
    args = (np.zeros((3, 32), np.float32), np.zeros((3, 64), np.float32), lc.pool, 0, lc.a_pages, lc.b_pages,
            lc.ranks, lc.scales, slot)
    plan = pk.lora_decode_plan(slot, 2)
    with pytest.raises(pk.KernelInputError, match="grouping='tiles'"):
        pk.lora_decode(*args, out_sizes=(32,), plan=plan)
    with pytest.raises(pk.KernelInputError, match=r"lora_decode_plan\(token_slot, 2\) for 3 tokens"):
        pk.lora_decode(*args, out_sizes=(32,), grouping="tiles", plan=pk.lora_decode_plan(np.zeros(40, np.int32), 2))
    with pytest.raises(pk.KernelInputError, match="plan must be"):
        pk.lora_decode(*args, out_sizes=(32,), grouping="tiles", plan=plan[0])
    with pytest.raises(pk.KernelInputError, match="token_slot must be a vector"):
        pk.lora_decode_plan(np.zeros((2, 2), np.int32), 2)
    with pytest.raises(pk.KernelInputError, match="num_slots must be >= 1"):
        pk.lora_decode_plan(slot, 0)


def test_grouping_choice_by_tokens_per_adapter():
    """Tiles where tokens share few adapters (a tile count under a third of the tokens), the per-token kernels for
    small batches and for batches where most tokens have their own adapter."""
    assert pk.lora_decode_grouping(["a"] * 256) == "tiles"
    assert pk.lora_decode_grouping([f"a{i % 5}" for i in range(256)]) == "tiles"
    assert pk.lora_decode_grouping(["a"] * 64) == "tiles"
    assert pk.lora_decode_grouping(["a"] * 16) == "none"  # small batches: the per-token kernels' small-batch knobs
    assert pk.lora_decode_grouping([f"a{i}" for i in range(256)]) == "none"
    assert pk.lora_decode_grouping([f"a{i % 70}" for i in range(256)]) == "none"  # 16 + 70 tiles > 256 / 3
    assert pk.lora_decode_grouping([f"a{i % 69}" for i in range(256)]) == "tiles"  # 16 + 69 tiles <= 256 / 3
    assert pk.lora_decode_grouping([None] * 200 + ["a"] * 10) == "none"  # no-adapter tokens cost nothing


def test_a_plan_with_ids_out_of_range_touches_nothing(lora_numpy_reference):
    """A plan is the caller's input: rows outside [0, T) and slots outside [0, S) count as none (no read or write
    out of bounds); its valid tiles still apply their adapters."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    T, S, outs = 20, 3, (32, 32)
    lc = make_lora_case(rng, num_layers=2, num_pages=200, page_rows=16, width=32, d_in=64, out_sizes=outs,
                        ranks=rng.choice([4, 16], size=(S, 2, 2)).astype(np.int32))
    slot = np.full(T, 1, np.int32)
    rows, tslot = (np.asarray(a).copy() for a in pk.lora_decode_plan(slot, S))
    rows = rows.reshape(len(tslot), TM)
    assert (rows[0] < T).all() and (rows[1] < T).sum() == 4  # tokens 0-15 and 16-19
    rows[0, :3] = (-3, T + 5, 2**30)  # tile 0's first three rows out of range
    tslot[1] = S + 2  # tile 1's slot out of range
    x = rng.standard_normal((T, 64)).astype(np.float32)
    y = rng.standard_normal((T, 64)).astype(np.float32)
    out = pk.lora_decode(y, x, lc.pool, 1, lc.a_pages, lc.b_pages, lc.ranks, lc.scales, slot, out_sizes=outs,
                         implementation="pallas", grouping="tiles", plan=(jnp.asarray(rows.reshape(-1)),
                                                                          jnp.asarray(tslot)))
    applied = np.zeros(T, bool)
    applied[[r for r in rows[0] if 0 <= r < T]] = True
    ref = lora_numpy_reference(y, x, lc, 1, np.where(applied, slot, -1))
    assert relative_error(out, ref, base=y) < TOLERANCE["float32"]
