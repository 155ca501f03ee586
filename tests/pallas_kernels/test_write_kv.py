"""write_kv on every backend against plain numpy row assignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.testing import np_dtype


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_kv_sets_rows_and_leaves_the_rest(implementation, dtype):
    rng = np.random.default_rng(3)
    L, P, R, W, T = 3, 10, 16, 96, 7
    dt = np_dtype(dtype)
    pool = rng.standard_normal((L, P, R, W)).astype(dt)
    k = rng.standard_normal((T, W)).astype(np.float32)
    v = rng.standard_normal((T, W)).astype(np.float32)
    rows = rng.permutation(P * R)[: 2 * T].astype(np.int32)
    k_rows, v_rows = rows[:T].copy(), rows[T:].copy()
    k_rows[2] = -1  # skipped
    v_rows[5] = -7
    layer = 1
    expect = pool.copy().reshape(L, P * R, W)
    for t in range(T):
        if k_rows[t] >= 0:
            expect[layer, k_rows[t]] = k[t].astype(dt)
        if v_rows[t] >= 0:
            expect[layer, v_rows[t]] = v[t].astype(dt)
    fn = jax.jit(pk.write_kv, static_argnames=("implementation",))
    out = fn(jnp.asarray(pool), jnp.int32(layer), k, v, k_rows, v_rows, implementation=implementation)
    assert out.dtype == pool.dtype
    np.testing.assert_array_equal(np.asarray(out), expect.reshape(pool.shape))


def test_write_kv_runs_in_place_when_the_pool_is_donated(implementation):
    pool = jnp.zeros((2, 64, 16, 32), jnp.float32)
    ptr = pool.unsafe_buffer_pointer()
    step = jax.jit(
        lambda p, k, r: pk.write_kv(p, 1, k, k, r, r + 1, implementation=implementation), donate_argnums=0
    )
    out = step(pool, jnp.ones((3, 32)), jnp.array([0, 5, 9], jnp.int32))
    assert pool.is_deleted()
    assert out.unsafe_buffer_pointer() == ptr  # the pool's own buffer came back, updated
    assert float(out[1].reshape(-1, 32)[5, 0]) == 1.0 and float(out[0].sum()) == 0.0
