"""lora_decode (MBGMV) on every backend against a dense float64 loop over tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.ops.lora_decode import pallas_triton
from pallas_kernels.ops.lora_layout import validate_lora_args
from pallas_kernels.testing import TOLERANCE, make_lora_case, np_dtype, relative_error

# (name, T, d_in, out_sizes, W, S, rank choices, slots) -- small shapes: interpret mode is slow.
CASES = [
    # q/k/v fused, d_in not a multiple of W, mixed ranks incl. 0, 1 and the max, slot -1 rows.
    ("qkv_mixed", 7, 80, (64, 32, 32), 32, 4, (0, 1, 5, 16, 17, 32), None),
    # One token, one module, rank exactly the max (two full rank blocks).
    ("one_token_max_rank", 1, 64, (96,), 32, 2, (32,), [1]),
    # MLP-like: outputs spanning several page chunks with a ragged tail, rank blocks = 3; slot 3 is
    # out of range (treated as no adapter).
    ("mlp_wide", 5, 32, (70, 70), 16, 3, (3, 33, 48), [2, -1, 0, 3, 1]),
]


def _run_case(implementation, dtype, name, T, d_in, out_sizes, W, S, rank_choices, slots, seed, reference,
              fused=False, k_splits=None, layer=1, **kernel_knobs):
    rng = np.random.default_rng(seed)
    L, R = 2, 16
    ranks = rng.choice(rank_choices, size=(S, L, len(out_sizes))).astype(np.int32)
    case = make_lora_case(
        rng, num_layers=L, num_pages=400, page_rows=R, width=W, d_in=d_in, out_sizes=out_sizes,
        ranks=ranks, dtype=dtype,
    )
    token_slot = np.asarray(slots if slots is not None else rng.integers(-1, S, T), np.int32)
    if slots is None and T >= 4:  # ids outside [0, S) are no adapter: the kernels check them themselves
        token_slot[rng.choice(T, 3, replace=False)] = (S, S + 3, -5)
    dt = np_dtype(dtype)
    x = rng.standard_normal((T, d_in)).astype(dt)
    y = rng.standard_normal((T, sum(out_sizes))).astype(dt)  # poisoned output: the op adds to it
    args = (jnp.asarray(y), jnp.asarray(x), jnp.asarray(case.pool), jnp.int32(layer), case.a_pages, case.b_pages,
            case.ranks, case.scales)
    if kernel_knobs:  # the kernel itself, with knobs the public op does not take (slots as given: it checks them)
        dims = validate_lora_args("t", *args, token_slot, out_sizes)
        out = pallas_triton.lora_decode_pallas(*args, jnp.asarray(token_slot), dims=dims,
                                               interpret=pk._backend.interpret_mode(), k_splits=k_splits,
                                               **kernel_knobs)
    else:
        fn = jax.jit(pk.lora_decode, static_argnames=("out_sizes", "implementation", "fused", "k_splits"))
        out = fn(*args, token_slot, out_sizes=out_sizes, implementation=implementation, fused=fused,
                 k_splits=k_splits)
    assert out.shape == y.shape and out.dtype == y.dtype
    ref = reference(y, x, case, int(np.clip(layer, 0, L - 1)), token_slot)  # a layer out of range is clipped
    err = relative_error(out, ref, base=y)
    assert err < TOLERANCE[dtype], f"{name}/{dtype}: relative error {err:.2e}"
    # Rows without an adapter are returned bit for bit.
    skip = (token_slot < 0) | (token_slot >= S)
    np.testing.assert_array_equal(np.asarray(out)[skip], y[skip])


def _quick_first(cases):
    """The cases as params: the first in the quick subset, the others in the full suite (each is an
    interpret-mode compile of a second or more on two cores with an empty compilation cache)."""
    return [pytest.param(c, id=c[0], marks=() if i == 0 else pytest.mark.slow) for i, c in enumerate(cases)]


# bfloat16 runs in the full suite (the quick subset reads bf16 in test_pool_storage.py), and so do the cases
# after the first.
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", _quick_first(CASES))
def test_lora_decode_matches_dense_loop(implementation, dtype, case, lora_numpy_reference):
    _run_case(implementation, dtype, *case, seed=hash((case[0], dtype)) % 2**31, reference=lora_numpy_reference)


# The fused variant, the split shrink and the knobs: every case in the full suite, the first in the quick subset.
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", _quick_first(CASES))
def test_lora_decode_fused_kernel_matches_dense_loop(dtype, case, lora_numpy_reference):
    """The one-launch variant (all rank rows of a token's adapter gathered per tile) on the same cases."""
    _run_case("pallas", dtype, *case, seed=hash((case[0], dtype, "fused")) % 2**31, reference=lora_numpy_reference,
              fused=True)


@pytest.mark.parametrize("k_splits", [2, 4])
@pytest.mark.parametrize("case", _quick_first(CASES))
def test_lora_decode_k_splits_match_dense_loop(k_splits, case, lora_numpy_reference):
    """The shrink's pass over d_in split over 2 or 4 programs (d_in not a multiple of the split included)."""
    _run_case("pallas", "float32", *case, seed=hash((case[0], k_splits)) % 2**31, reference=lora_numpy_reference,
              k_splits=k_splits)


# The quick subset runs three of the knobs (per-block expand, per-chunk expand, column masks); the full suite, all
# six. These cases have at most 16 tokens, so the per-chunk expand (the path of larger batches: a branch per count
# of live rank blocks, ranks spanning 1-2 of them in the quick case and 1-3 in mlp_wide) is asked for by name.
@pytest.mark.parametrize("knobs", [dict(expand_per_chunk=False, grouping="none"),
                                   dict(expand_per_chunk=True, grouping="none"),
                                   pytest.param(dict(expand_per_chunk=True, live_blocks=False, num_stages=3,
                                                     grouping="none"), marks=pytest.mark.slow),
                                   pytest.param(dict(expand_per_chunk=True, expand_warps=8, block_n=8, grouping="none"),
                                                marks=pytest.mark.slow),
                                   pytest.param(dict(expand_per_chunk=False, expand_warps=2, block_n=8,
                                                     grouping="none"), marks=pytest.mark.slow),
                                   dict(column_masks=True, grouping="none")],
                         ids=["expand_per_block", "expand_per_chunk", "expand_per_chunk_all_blocks_st3",
                              "expand_per_chunk_w8_bn8", "expand_per_block_w2_bn8", "column_masks"])
@pytest.mark.parametrize("case", _quick_first(CASES))
def test_lora_decode_kernel_knobs_match_dense_loop(knobs, case, lora_numpy_reference):
    """The kernel's knobs: one expand program per block or per page chunk (with several blocks per chunk), other
    warps and blocks, per-column masks everywhere."""
    _run_case("pallas", "float32", *case, seed=hash((case[0], str(knobs))) % 2**31, reference=lora_numpy_reference,
              **knobs)


def test_lora_decode_block_masks_on_a_partial_page_chunk(lora_numpy_reference):
    """A module of 48 columns in 32-column pages, 16-column blocks: its second chunk holds one block and
    the loop's next block lies wholly past the module (one predicate masks it, no per-column compare)."""
    case = ("partial_chunk", 3, 32, (48, 16), 32, 2, (4, 16), None)
    _run_case("pallas", "float32", *case, seed=5, reference=lora_numpy_reference, block_n=16, grouping="none",
              expand_per_chunk=True)


def test_case_packing_follows_the_page_layout():
    """pool[layer, a_pages[s, m, c, j], i, w] == A^T[j*R + i, c*W + w] inside the rank and d_in."""
    rng = np.random.default_rng(4)
    R, W, d_in, outs = 16, 32, 80, (40,)
    ranks = np.array([[[20], [7]]], np.int32)  # one slot, two layers
    case = make_lora_case(rng, num_layers=2, num_pages=64, page_rows=R, width=W, d_in=d_in, out_sizes=outs,
                          ranks=ranks)
    for layer in range(2):
        r = ranks[0, layer, 0]
        for j in range(2):
            for c in range(3):
                page = case.pool[layer, case.a_pages[0, 0, c, j]].astype(np.float64)
                rows, cols = min(R, max(0, r - j * R)), min(W, d_in - c * W)
                dense = case.a_t[0, 0, layer, j * R : j * R + rows, c * W : c * W + cols]
                np.testing.assert_array_equal(page[:rows, :cols], dense)
                assert np.isnan(page[rows:]).all() and np.isnan(page[:, cols:]).all()
            for c in range(2):
                page = case.pool[layer, case.b_pages[0, 0, c, j]].astype(np.float64)
                rows, cols = min(R, max(0, r - j * R)), min(W, outs[0] - c * W)
                dense = case.b[0, 0, layer, j * R : j * R + rows, c * W : c * W + cols]
                np.testing.assert_array_equal(page[:rows, :cols], dense)


def test_lora_decode_rejects_bad_shapes():
    rng = np.random.default_rng(0)
    case = make_lora_case(
        rng, num_layers=1, num_pages=64, page_rows=16, width=32, d_in=64, out_sizes=(32,),
        ranks=np.full((2, 1, 1), 8), poison=False,
    )
    x = np.zeros((3, 64), np.float32)
    y = np.zeros((3, 32), np.float32)
    slot = np.zeros(3, np.int32)
    args = (y, x, case.pool, 0, case.a_pages, case.b_pages, case.ranks, case.scales, slot)
    with pytest.raises(pk.KernelInputError, match="y must have shape"):
        pk.lora_decode(np.zeros((3, 33), np.float32), *args[1:], out_sizes=(32,))
    with pytest.raises(pk.KernelInputError, match="input chunks"):
        pk.lora_decode(y, np.zeros((3, 96), np.float32), *args[2:], out_sizes=(32,))
    with pytest.raises(pk.KernelInputError, match="modules"):
        pk.lora_decode(*args, out_sizes=(16, 16))
    with pytest.raises(pk.KernelInputError, match="token_slot"):
        pk.lora_decode(*args[:-1], np.zeros(4, np.int32), out_sizes=(32,))
    with pytest.raises(pk.KernelInputError, match="layer 1 is outside"):
        pk.lora_decode(*args[:3], 1, *args[4:], out_sizes=(32,))
    with pytest.raises(pk.KernelInputError, match="implementation"):
        pk.lora_decode(*args, out_sizes=(32,), implementation="cuda")


@pytest.mark.parametrize("case", _quick_first(CASES))
def test_lora_decode_large_batch_knobs_match_dense_loop(case, lora_numpy_reference):
    """The knobs batches above SMALL_BATCH_TOKENS get (one program per rank block's pass over d_in, one expand
    program per page chunk looping over its blocks), forced onto the small cases; block_n 16 gives the 32-column
    pages two blocks each, as 1024-column pages have four of 256 on the GPU."""
    _run_case("pallas", "float32", *case, seed=hash((case[0], "large")) % 2**31, reference=lora_numpy_reference,
              grouping="none", k_splits=1, expand_per_chunk=True, block_n=16)


def test_per_token_knobs_follow_the_batch_size():
    from pallas_kernels.ops.lora_layout import LoraDims

    def dims(T):
        return LoraDims(num_tokens=T, d_in=4096, out_sizes=(4096, 1024, 1024), num_layers=2, num_pages=64,
                        page_rows=16, width=1024, num_slots=4, in_chunks=4, out_chunks_max=4, rank_blocks=4)

    small, large = pallas_triton.SMALL_BATCH_TOKENS, pallas_triton.SMALL_BATCH_TOKENS + 1
    assert pallas_triton.per_token_knobs(dims(1)) == (256, pallas_triton.SMALL_BLOCK_N, 8, False)
    bk, bn, ks, per_chunk = pallas_triton.per_token_knobs(dims(small))
    assert ks > 1 and not per_chunk and bn == pallas_triton.SMALL_BLOCK_N
    assert pallas_triton.per_token_knobs(dims(large)) == (256, 256, 1, True)
    assert pallas_triton.per_token_knobs(dims(1), k_splits=2, expand_per_chunk=True, block_n=64) == (256, 64, 2, True)
    assert pallas_triton.per_token_knobs(dims(large), expand_per_chunk=False)[3] is False


@pytest.mark.parametrize("layer", [5, -2], ids=["past_the_last", "negative"])
@pytest.mark.parametrize("knobs", [dict(), dict(expand_per_chunk=True, grouping="none"), dict(fused=True)],
                         ids=["defaults", "expand_per_chunk", "fused"])
def test_lora_decode_clips_a_traced_layer_out_of_range(layer, knobs, lora_numpy_reference):
    """The kernels clip the layer themselves (as the XLA path does): a traced 5 of 2 layers reads layer 1, -2 reads
    layer 0."""
    case = CASES[0]
    _run_case("pallas", "float32", *case, seed=hash((layer, str(knobs))) % 2**31, reference=lora_numpy_reference,
              layer=layer, **knobs)
