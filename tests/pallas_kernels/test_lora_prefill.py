"""lora_prefill (MBGMM) on every backend against a dense float64 loop over tokens."""

import functools
import zlib

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.ops.lora_layout import sanitize_slots, validate_lora_args
from pallas_kernels.ops.lora_prefill import pallas_triton, tiles
from pallas_kernels.ops.lora_prefill.reference import lora_prefill_reference
from pallas_kernels.testing import TOLERANCE, make_lora_case, np_dtype, relative_error

TM = 16  # tokens per tile in these tests (the smallest the kernel takes)


def _sorted_slots(rng, T, S, runs):
    """Runs of equal slots (sorted by adapter) with -1 padding runs at both ends; some slots unused."""
    cuts = np.sort(rng.choice(np.arange(1, T), size=len(runs) - 1, replace=False))
    return np.concatenate([np.full(n, s) for s, n in zip(runs, np.diff(np.r_[0, cuts, T]))]).astype(np.int32)


# (name, T, d_in, out_sizes, W, S, rank choices, slot maker)
CASES = [
    # q/k/v fused, T not a multiple of TM, segments of mixed ranks incl. 0/1/max, -1 runs, slot 2 unused.
    ("segments", 45, 80, (64, 32, 32), 32, 4, (0, 1, 7, 16, 32),
     lambda r, T, S: _sorted_slots(r, T, S, [-1, 0, 1, 3, -1])),
    # One token.
    ("one_token", 1, 48, (32, 40), 16, 2, (5, 32), lambda r, T, S: np.array([1], np.int32)),
    # A single long segment at the max rank (three rank blocks) spanning several tiles.
    ("one_segment", 70, 64, (48,), 32, 2, (48,), lambda r, T, S: np.full(T, 1, np.int32)),
    # Slots in random order: more runs than the static tile list holds (correct: sorted, then put back).
    ("unsorted", 40, 32, (32, 32), 32, 3, (0, 8, 20), lambda r, T, S: r.integers(-1, S, T).astype(np.int32)),
]


def _make(dtype, name, T, d_in, out_sizes, W, S, rank_choices, slots):
    rng = np.random.default_rng(zlib.crc32(f"{name}/{dtype}".encode()))
    L, R = 2, 16
    ranks = rng.choice(rank_choices, size=(S, L, len(out_sizes))).astype(np.int32)
    case = make_lora_case(
        rng, num_layers=L, num_pages=600, page_rows=R, width=W, d_in=d_in, out_sizes=out_sizes, ranks=ranks,
        rank_blocks=-(-max(rank_choices) // R), dtype=dtype,
    )
    token_slot = slots(rng, T, S)
    dt = np_dtype(dtype)
    x = rng.standard_normal((T, d_in)).astype(dt)
    y = rng.standard_normal((T, sum(out_sizes))).astype(dt)  # poisoned output: the op adds to it
    return case, token_slot, x, y


@pytest.mark.parametrize(
    "dtype,case",
    # The quick subset keeps the float32 "segments" case; bfloat16 (read quickly in test_pool_storage.py) and
    # the other float32 cases run in the full suite.
    [("float32", c) if c[0] == "segments" else pytest.param("float32", c, marks=pytest.mark.slow)
     for c in CASES] + [pytest.param("bfloat16", CASES[0], marks=pytest.mark.slow),
                                       pytest.param("bfloat16", CASES[2], marks=pytest.mark.slow)],
    ids=[f"f32-{c[0]}" for c in CASES] + ["bf16-segments", "bf16-one_segment"],
)
def test_lora_prefill_matches_dense_loop(implementation, dtype, case, lora_numpy_reference):
    name, T, d_in, out_sizes, W, S, rank_choices, slots = case
    case_, token_slot, x, y = _make(dtype, *case)
    layer = 1
    fn = jax.jit(pk.lora_prefill, static_argnames=("out_sizes", "implementation", "block_tokens"))
    out = fn(
        jnp.asarray(y), jnp.asarray(x), jnp.asarray(case_.pool), jnp.int32(layer), case_.a_pages, case_.b_pages,
        case_.ranks, case_.scales, token_slot, out_sizes=out_sizes, implementation=implementation, block_tokens=TM,
    )
    assert out.shape == y.shape and out.dtype == y.dtype
    if name != "unsorted":  # sorted runs fit the static tile list: the kernel itself ran
        count = tiles.segment_tiles(jnp.asarray(token_slot), TM, tiles.max_tiles(T, S, TM))[3]
        assert int(count) <= tiles.max_tiles(T, S, TM)
    ref = lora_numpy_reference(y, x, case_, layer, token_slot)
    err = relative_error(out, ref, base=y)
    assert err < TOLERANCE[dtype], f"{name}/{dtype}: relative error {err:.2e}"
    skip = token_slot < 0
    np.testing.assert_array_equal(np.asarray(out)[skip], y[skip])


@pytest.mark.parametrize("method", ["ragged", "gather"])
def test_reference_methods_match_dense_loop(method, lora_numpy_reference):
    case_, token_slot, x, y = _make("float32", *CASES[0])
    out_sizes = CASES[0][3]
    args = (y, x, case_.pool, 1, case_.a_pages, case_.b_pages, case_.ranks, case_.scales, token_slot)
    dims = validate_lora_args("test", *args, out_sizes)
    out = jax.jit(lora_prefill_reference, static_argnames=("dims", "method"))(*args, dims=dims, method=method)
    err = relative_error(out, lora_numpy_reference(y, x, case_, 1, token_slot), base=y)
    assert err < 1e-5


def test_segment_tiles_partition_tokens_into_single_slot_tiles():
    rng = np.random.default_rng(7)
    T, S = 100, 5
    slot = _sorted_slots(rng, T, S, [-1, 0, 2, 3, 4, -1])
    nt = tiles.max_tiles(T, S, TM)
    tile_list = jax.jit(tiles.segment_tiles, static_argnums=(1, 2))(jnp.asarray(slot), TM, nt)
    start, end, tslot, count = (np.asarray(a) for a in tile_list)
    assert count <= nt
    covered = np.zeros(T, int)
    for a, b, s in zip(start, end, tslot):
        if a >= T:
            assert s == -1 and b == T
            continue
        assert 0 < b - a <= TM and a // TM == (b - 1) // TM
        assert np.all(slot[a:b] == s)
        covered[a:b] += 1
    np.testing.assert_array_equal(covered, 1)


def test_pallas_path_has_no_xla_grouped_matmul_branch():
    """Unsorted slots are handled by sorting, not by an XLA ragged_dot branch: XLA reserves the working memory
    of every `cond` branch, and ragged_dot's at prefill sizes ran a GPU step out of memory."""
    name, T, d_in, out_sizes, W, S, rank_choices, slots = CASES[3]
    case_, token_slot, x, y = _make("float32", *CASES[3])
    args = (jnp.asarray(y), jnp.asarray(x), jnp.asarray(case_.pool), jnp.int32(0), case_.a_pages, case_.b_pages,
            case_.ranks, case_.scales, jnp.asarray(token_slot))

    def program(impl, T):  # the traced program (primitives, whatever the platform lowers them to)
        a = (args[0][:T], args[1][:T]) + args[2:8] + (args[8][:T],)
        return str(jax.make_jaxpr(lambda *a: pk.lora_prefill(*a, out_sizes=out_sizes, implementation=impl))(*a))

    assert "ragged_dot" in program("xla", T)  # the check can see one (T > 2 S: the "ragged" method)
    assert "ragged_dot" not in program("pallas", T)
    assert "pallas_call" in program("pallas", T)


# A module of 48 columns in 32-column pages: with 16-column blocks its second chunk holds one block, and the
# loop's next block lies wholly past the module (masked by one predicate, no per-column compare).
PARTIAL_CHUNK = ("partial_chunk", 20, 32, (48, 16), 32, 2, (4, 16), lambda r, T, S: _sorted_slots(r, T, S, [0, 1]))


# The quick subset runs one of the knobs; the full suite, all four.
@pytest.mark.parametrize("case,knobs", [
    (CASES[0], dict(shrink_per_module=False, expand_per_chunk=False)),
    pytest.param(CASES[0], dict(block_k=16, block_n=16, num_warps=8), marks=pytest.mark.slow),
    pytest.param(CASES[0], dict(column_masks=True), marks=pytest.mark.slow),
    pytest.param(PARTIAL_CHUNK, dict(block_n=16), marks=pytest.mark.slow),
    (CASES[2], dict(module_fastest=False)),
    (CASES[0], dict(y_align_hint=False, num_stages=2, module_fastest=False)),
], ids=["per_tile_per_block", "small_blocks", "column_masks", "partial_chunk", "tile_fastest", "former_defaults"])
def test_lora_prefill_kernel_knobs_match_dense_loop(case, knobs, lora_numpy_reference):
    """The kernel's knobs: one shrink program per tile and one expand program per block (instead of per
    module and per page chunk), small blocks (several per chunk), per-column masks, the shrink's grid with the tile
    index fastest, and the defaults before 2026-12-01 (no alignment hint, 2 stages)."""
    name, T, d_in, out_sizes, W, S, rank_choices, slots = case
    case_, token_slot, x, y = _make("float32", *case)
    args = (jnp.asarray(y), jnp.asarray(x), jnp.asarray(case_.pool), jnp.int32(1), case_.a_pages, case_.b_pages,
            case_.ranks, case_.scales)
    dims = validate_lora_args("t", *args, token_slot, out_sizes)
    nt = tiles.max_tiles(T, S, TM)
    tile_list = tiles.segment_tiles(sanitize_slots(token_slot, dims), TM, nt)[:3]
    out = pallas_triton.lora_prefill_pallas(*args, tile_list, dims=dims, interpret=pk._backend.interpret_mode(),
                                            num_tiles=nt, block_tokens=TM, **knobs)
    err = relative_error(out, lora_numpy_reference(y, x, case_, 1, token_slot), base=y)
    assert err < TOLERANCE["float32"], f"{knobs}: relative error {err:.2e}"


def _primitives_outside_kernels(jaxpr) -> set:
    """Names of the primitives of a jaxpr and its sub-jaxprs, not looking inside Pallas kernels."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name == "pallas_call":
            continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives_outside_kernels(sub)
    return names


def test_slots_in_runs_runs_the_kernel_with_no_device_side_branch(lora_numpy_reference):
    """With the caller's promise that slots come in runs there is no `cond` (XLA:GPU would read its predicate
    on the host and hold the dispatching thread), and the result is the dense loop's."""
    case_, token_slot, x, y = _make("float32", *CASES[0])
    args = (jnp.asarray(y), jnp.asarray(x), jnp.asarray(case_.pool), jnp.int32(0), case_.a_pages, case_.b_pages,
            case_.ranks, case_.scales, jnp.asarray(token_slot))

    def run(*a, **kw):
        return pk.lora_prefill(*a, out_sizes=CASES[0][3], implementation="pallas", **kw)

    assert "cond" in _primitives_outside_kernels(jax.make_jaxpr(run)(*args).jaxpr)
    assert "cond" not in _primitives_outside_kernels(jax.make_jaxpr(functools.partial(run, slots_in_runs=True))(*args).jaxpr)
    out = jax.jit(functools.partial(run, slots_in_runs=True))(*args)
    ref = lora_numpy_reference(y, x, case_, 0, token_slot)
    assert relative_error(out, ref) < TOLERANCE["float32"]


def test_precomputed_tiles_match_the_dense_loop_and_leave_no_tile_list_in_the_call(lora_numpy_reference):
    """`lora_prefill_tiles` once, passed to every call: the result is the dense loop's, and the call itself then
    computes no tile list (no scan or scatter outside the kernels: the ops that took 15-19 us per call on the H200)."""
    name, T, d_in, out_sizes, W, S, rank_choices, slots = CASES[0]
    case_, token_slot, x, y = _make("float32", *CASES[0])
    args = (jnp.asarray(y), jnp.asarray(x), jnp.asarray(case_.pool), jnp.int32(1), case_.a_pages, case_.b_pages,
            case_.ranks, case_.scales, jnp.asarray(token_slot))
    tl = pk.lora_prefill_tiles(jnp.asarray(token_slot), S, TM)
    assert all(a.shape == (tiles.max_tiles(T, S, TM),) and a.dtype == jnp.int32 for a in tl)

    def run(*a, tiles=None):
        return pk.lora_prefill(*a, out_sizes=out_sizes, implementation="pallas", block_tokens=TM,
                               slots_in_runs=True, tiles=tiles)

    inside = _primitives_outside_kernels(jax.make_jaxpr(run)(*args, tiles=tl).jaxpr)
    assert not inside & {"cumsum", "scatter", "scatter-add", "cond", "sort"}, inside
    assert inside != _primitives_outside_kernels(jax.make_jaxpr(run)(*args).jaxpr)
    out = jax.jit(run)(*args, tiles=tl)
    err = relative_error(out, lora_numpy_reference(y, x, case_, 1, token_slot), base=y)
    assert err < TOLERANCE["float32"], err


def test_tiles_out_of_range_touch_nothing(lora_numpy_reference):
    """A tile list whose rows run past T or before 0, and whose slots lie outside [0, S), touches only the rows
    inside [0, T) and only for slots inside [0, S): the kernels check rows and slots themselves (on a GPU an
    unchecked row would be read and written out of bounds)."""
    name, T, d_in, out_sizes, W, S, rank_choices, slots = CASES[0]
    case_, token_slot, x, y = _make("float32", *CASES[0])
    args = (jnp.asarray(y), jnp.asarray(x), jnp.asarray(case_.pool), jnp.int32(1), case_.a_pages, case_.b_pages,
            case_.ranks, case_.scales)
    dims = validate_lora_args("t", *args, token_slot, out_sizes)
    # Four hostile tiles after the real ones.
    start, end, slot = (np.concatenate([np.asarray(a), np.zeros(4, np.int32)])
                        for a in pk.lora_prefill_tiles(jnp.asarray(token_slot), S, TM))
    used = start.shape[0] - 4
    # The case's first and last runs have no adapter; the hostile tiles land on those rows only, so that no two
    # tiles write one row.
    lo = int(np.argmax(token_slot != -1))
    hi = int(np.argmax(token_slot[::-1] != -1))
    assert 1 <= lo < TM and hi >= 1
    start[used:used + 4] = [T - hi, lo - TM, 0, 5]
    end[used:used + 4] = [T + 40, lo, 9, 12]
    slot[used:used + 4] = [0, 1, S + 2, -7]
    nt = start.shape[0]
    out = pallas_triton.lora_prefill_pallas(*args, tuple(jnp.asarray(a) for a in (start, end, slot)), dims=dims,
                                            interpret=pk._backend.interpret_mode(), num_tiles=nt, block_tokens=TM)
    # What the valid parts do: rows T-hi..T-1 on slot 0, rows 0..lo-1 on slot 1; slots S + 2 and -7 nothing.
    want = token_slot.copy()
    want[T - hi:], want[:lo] = 0, 1
    assert np.all(np.isfinite(np.asarray(out)))
    err = relative_error(out, lora_numpy_reference(y, x, case_, 1, want), base=y)
    assert err < TOLERANCE["float32"], err


@pytest.mark.parametrize("bad,match", [
    ("short", "tiles must be"), ("floats", "tiles must be"), ("not_in_runs", "slots_in_runs"),
])
def test_bad_tiles_are_refused(bad, match):
    name, T, d_in, out_sizes, W, S, rank_choices, slots = CASES[0]
    case_, token_slot, x, y = _make("float32", *CASES[0])
    tl = pk.lora_prefill_tiles(jnp.asarray(token_slot), S, TM)
    kw = dict(slots_in_runs=True)
    if bad == "short":
        tl = tuple(a[:-1] for a in tl)
    elif bad == "floats":
        tl = tuple(a.astype(jnp.float32) for a in tl)
    else:
        kw = {}
    with pytest.raises(pk.KernelInputError, match=match):
        pk.lora_prefill(jnp.asarray(y), jnp.asarray(x), jnp.asarray(case_.pool), 0, case_.a_pages, case_.b_pages,
                        case_.ranks, case_.scales, jnp.asarray(token_slot), out_sizes=out_sizes,
                        implementation="pallas", block_tokens=TM, tiles=tl, **kw)
    with pytest.raises(pk.KernelInputError, match="num_slots"):
        pk.lora_prefill_tiles(jnp.asarray(token_slot), 0)


@pytest.mark.parametrize("out_sizes,W", [((4096, 1024, 1024), 1024), ((48, 16), 32), ((2048, 512, 512), 1024),
                                         ((70, 70), 16), ((11008, 11008), 1024)])
def test_y_alignment_hint_divides_every_chunk_column(out_sizes, W):
    """The hint told to the compiler is a power of two dividing the first y column of every page chunk (a wrong
    one would let the GPU use misaligned vector accesses); per-device sizes under tensor parallelism included."""
    from pallas_kernels.ops.lora_layout import output_chunks
    d_in = 64
    case = make_lora_case(np.random.default_rng(0), num_layers=1, num_pages=64, page_rows=16, width=W, d_in=d_in,
                          out_sizes=out_sizes, ranks=np.full((1, 1, len(out_sizes)), 4, np.int32), dtype="float32")
    dims = validate_lora_args("t", jnp.zeros((1, sum(out_sizes))), jnp.zeros((1, d_in)), jnp.asarray(case.pool), 0,
                              case.a_pages, case.b_pages, case.ranks, case.scales, np.zeros(1, np.int32), out_sizes)
    cols = output_chunks(dims)[:, 2]
    a = pallas_triton.y_alignment(cols)
    assert a & (a - 1) == 0 and all(int(c) % a == 0 for c in cols)
    assert a == 64 or any(int(c) % (2 * a) for c in cols)  # the largest such power, up to 64


def test_three_stages_only_where_their_tiles_fit():
    """bf16 at rank 64 (measured on the H200) and 128 get 3 stages; float32 at rank 64 and bf16 at rank 256, whose
    three stages of tiles would not fit the budget for an SM's shared memory, get 2."""
    from pallas_kernels.ops.lora_layout import LoraDims

    def dims(rank_blocks):
        return LoraDims(num_tokens=8192, d_in=4096, out_sizes=(4096, 1024, 1024), num_layers=1, num_pages=8,
                        page_rows=16, width=1024, num_slots=64, in_chunks=4, out_chunks_max=4,
                        rank_blocks=rank_blocks)

    assert pallas_triton.default_stages(dims(4), 64, 128, 128, 2) == 3
    assert pallas_triton.default_stages(dims(4), 64, 128, 128, 4) == 2
    assert pallas_triton.default_stages(dims(8), 64, 128, 128, 2) == 3
    assert pallas_triton.default_stages(dims(16), 64, 128, 128, 2) == 2
