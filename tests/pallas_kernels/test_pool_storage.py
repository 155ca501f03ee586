"""A bfloat16 pool stored as uint16 bits (its CPU storage): every op reads and writes it as the bf16 pool it
stands for, and no write makes a pass over the whole pool."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import pool_storage
from pallas_kernels.testing import TOLERANCE, make_lora_case, pool_sized_passes, relative_error
from tests.pallas_kernels import test_paged_decode_attention as decode_tests
from tests.pallas_kernels import test_paged_prefill_attention as prefill_tests


def bits(pool) -> jax.Array:
    """The uint16 pool holding the same bits as a bf16 pool."""
    return jax.lax.bitcast_convert_type(jnp.asarray(pool, jnp.bfloat16), jnp.uint16)


def test_storage_dtype_is_bits_only_for_bfloat16_on_a_cpu():
    assert pool_storage.storage_dtype(jnp.bfloat16, "cpu") == jnp.uint16
    for backend in ("gpu", "tpu"):
        assert pool_storage.storage_dtype(jnp.bfloat16, backend) == jnp.bfloat16
    for dt in (jnp.float32, jnp.float16):
        assert pool_storage.storage_dtype(dt, "cpu") == dt
    assert pool_storage.element_dtype(jnp.uint16) == jnp.bfloat16
    assert pool_storage.element_dtype(jnp.zeros((1,), jnp.float32)) == jnp.float32


@pytest.mark.parametrize("donate", [False, True])
def test_write_kv_on_bits_writes_the_bf16_bits(donate):
    rng = np.random.default_rng(11)
    L, P, R, W, T = 2, 12, 16, 64, 9
    pool = jnp.asarray(rng.standard_normal((L, P, R, W)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((T, W)), jnp.float32)  # cast to bf16 on the way in, as for a bf16 pool
    v = jnp.asarray(rng.standard_normal((T, W)), jnp.bfloat16)
    rows = rng.permutation(P * R)[: 2 * T].astype(np.int32)
    k_rows, v_rows = rows[:T].copy(), rows[T:].copy()
    k_rows[1], v_rows[4] = -1, P * R + 3  # skipped
    want = pk.write_kv(pool, 1, k, v, k_rows, v_rows, implementation="xla")
    fn = jax.jit(pk.write_kv, donate_argnums=(0,) if donate else ())
    got = fn(bits(pool), 1, k, v, k_rows, v_rows)
    assert got.dtype == jnp.uint16 and got.shape == pool.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(bits(want)))


def test_write_kv_on_bits_makes_no_pass_over_the_pool():
    """The bf16 pool's scatter is widened to float32 over the whole pool on a CPU (the detector sees it);
    the bits pool's is not."""
    shape = (2, 250, 16, 32)  # a page count no other array of the program has
    step = jax.jit(lambda p, k, r: pk.write_kv(p, 1, k, k, r, r + 1, implementation="xla"), donate_argnums=0)
    k, r = jnp.ones((3, 32), jnp.bfloat16), jnp.array([0, 5, 9], jnp.int32)
    hlo = step.lower(jnp.zeros(shape, jnp.uint16), k, r).compile().as_text()
    assert pool_sized_passes(hlo, shape, "uint16") == []
    if jax.default_backend() == "cpu":
        widened = step.lower(jnp.zeros(shape, jnp.bfloat16), k, r).compile().as_text()
        assert pool_sized_passes(widened, shape, "bfloat16")


@pytest.mark.parametrize("case", decode_tests.CASES[:2], ids=[c[0] for c in decode_tests.CASES[:2]])
def test_paged_decode_attention_reads_bits_as_bf16(case):
    name, lengths, nb, nq, nkv, d, window = case
    q, pool, layer, kp, vp, lens, k, v = decode_tests._make("bfloat16", zlib.crc32(name.encode()), lengths, nb, nq,
                                                            nkv, d)
    fn = jax.jit(pk.paged_decode_attention, static_argnames=("sm_scale", "sliding_window", "implementation"))
    kw = dict(sm_scale=d ** -0.5, sliding_window=window)
    got = fn(jnp.asarray(q), bits(pool), layer, kp, vp, lens, **kw)
    want = fn(jnp.asarray(q), jnp.asarray(pool), layer, kp, vp, lens, implementation="xla", **kw)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    ref = decode_tests._numpy_reference(q, k, v, lens, d ** -0.5, window)
    assert relative_error(got, ref) < TOLERANCE["bfloat16"]


@pytest.mark.parametrize("case", prefill_tests.CASES[:2], ids=[c[0] for c in prefill_tests.CASES[:2]])
def test_paged_prefill_attention_reads_bits_as_bf16(case):
    name, lengths, chunks, nb, nq, nkv, d, window, align = case
    q, pool, layer, rows, pos, kp, vp, k, v = prefill_tests._make("bfloat16", zlib.crc32(name.encode()), lengths,
                                                                  chunks, nb, nq, nkv, d, align=align)
    fn = jax.jit(pk.paged_prefill_attention, static_argnames=("sm_scale", "sliding_window", "implementation"))
    kw = dict(sm_scale=d ** -0.5, sliding_window=window)
    got = fn(jnp.asarray(q), bits(pool), layer, rows, pos, kp, vp, **kw)
    want = fn(jnp.asarray(q), jnp.asarray(pool), layer, rows, pos, kp, vp, implementation="xla", **kw)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    ref = prefill_tests._numpy_reference(q, rows, pos, k, v, d ** -0.5, window)
    assert relative_error(got, ref) < TOLERANCE["bfloat16"]


def _lora_case(T):
    rng = np.random.default_rng(5)
    S, L, out_sizes = 3, 2, (64, 32)
    ranks = rng.choice([0, 4, 16, 24], size=(S, L, len(out_sizes))).astype(np.int32)
    case = make_lora_case(rng, num_layers=L, num_pages=200, page_rows=16, width=32, d_in=48, out_sizes=out_sizes,
                          ranks=ranks, rank_blocks=2, dtype="bfloat16")
    x = jnp.asarray(rng.standard_normal((T, 48)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((T, sum(out_sizes))), jnp.bfloat16)
    slots = np.sort(rng.integers(-1, S, T)).astype(np.int32)
    return case, x, y, slots


@pytest.mark.parametrize("op,T", [("lora_decode", 5), pytest.param("lora_prefill", 3, marks=pytest.mark.slow),
                                 ("lora_prefill", 40)],
                         ids=["decode", "prefill_gather", "prefill_ragged"])
def test_lora_reads_bits_as_bf16(op, T, lora_numpy_reference):
    case, x, y, slots = _lora_case(T)
    fn = jax.jit(getattr(pk, op), static_argnames=("out_sizes", "implementation"))

    def run(pool, **kw):
        return fn(y, x, pool, 1, case.a_pages, case.b_pages, case.ranks, case.scales, slots,
                  out_sizes=case.out_sizes, **kw)

    got = run(bits(case.pool))
    want = run(jnp.asarray(case.pool), implementation="xla")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    ref = lora_numpy_reference(y, x, case, 1, slots)
    assert relative_error(got, ref, base=y) < TOLERANCE["bfloat16"]


def test_pallas_refuses_bits_and_dtypes_are_checked_against_the_elements():
    pool = jnp.zeros((2, 8, 16, 32), jnp.uint16)
    k, r = jnp.ones((2, 32), jnp.bfloat16), jnp.array([0, 1], jnp.int32)
    with pytest.raises(pk.KernelInputError, match="uint16 bits"):
        pk.write_kv(pool, 0, k, k, r, r, implementation="pallas")
    q = jnp.ones((1, 2, 16), jnp.bfloat16)
    pages, lens = jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32)
    with pytest.raises(pk.KernelInputError, match="uint16 bits"):
        pk.paged_decode_attention(q, pool, 0, pages, pages, lens, sm_scale=0.25, implementation="pallas")
    with pytest.raises(pk.KernelInputError, match="must match the pool dtype bfloat16"):
        pk.paged_decode_attention(q.astype(jnp.float32), pool, 0, pages, pages, lens, sm_scale=0.25)
    with pytest.raises(pk.KernelInputError, match="pool must be a float array"):
        pk.write_kv(jnp.zeros((2, 8, 16, 32), jnp.int32), 0, k, k, r, r)
