"""The kernels are ordinary JAX functions: jit with a traced layer inside lax.scan, vmap, shard_map."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.testing import kv_page_tables, make_lora_case, relative_error

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_scan_over_layers_with_traced_layer(implementation):
    """The engine's pattern: one jitted scan over layers writing K/V, attending and adding LoRA."""
    rng = np.random.default_rng(1)
    L, P, R, D, nkv, nq, B = 3, 64, 16, 16, 2, 4, 2
    W = nkv * D
    outs = (nq * D,)
    ranks = rng.choice([0, 4, 16], size=(2, L, 1)).astype(np.int32)
    case = make_lora_case(rng, num_layers=L, num_pages=P, page_rows=R, width=W, d_in=W, out_sizes=outs,
                          ranks=ranks, poison=False)
    lengths = np.array([9, 20], np.int32)
    k_pages, v_pages = kv_page_tables(rng, [32, 32], 2, P, R)
    pool = jnp.asarray(case.pool).at[:, np.unique(np.r_[k_pages.ravel(), v_pages.ravel()])].set(0.5)
    slot = np.array([1, -1], np.int32)
    x = rng.standard_normal((B, W)).astype(np.float32)
    rows = k_pages[np.arange(B), (lengths - 1) // R] * R + (lengths - 1) % R
    vrows = v_pages[np.arange(B), (lengths - 1) // R] * R + (lengths - 1) % R

    def step(pool, x, impl):
        def layer_fn(carry, layer):
            pool, h = carry
            pool = pk.write_kv(pool, layer, h, h * 0.5, rows, vrows, implementation=impl)
            q = pk.lora_decode(
                jnp.tile(h, (1, nq // nkv)), h, pool, layer, case.a_pages, case.b_pages, case.ranks, case.scales,
                slot, out_sizes=outs, implementation=impl,
            ).reshape(B, nq, D)
            o = pk.paged_decode_attention(q, pool, layer, k_pages, v_pages, lengths, sm_scale=0.25, implementation=impl)
            return (pool, o.reshape(B, nq * D)[:, :W]), None

        (pool, h), _ = jax.lax.scan(layer_fn, (pool, x), jnp.arange(L, dtype=jnp.int32))
        return pool, h

    run = jax.jit(step, static_argnums=2, donate_argnums=0)
    got_pool, got = run(pool.copy(), x, implementation)
    want_pool, want = run(pool.copy(), x, "xla")
    assert relative_error(got, want) < 1e-5
    assert relative_error(got_pool, want_pool) < 1e-6


@pytest.mark.slow
def test_vmap_over_independent_batches(implementation):
    rng = np.random.default_rng(2)
    outs = (32,)
    ranks = np.array([[[8]], [[16]]], np.int32)
    case = make_lora_case(rng, num_layers=1, num_pages=40, page_rows=16, width=16, d_in=32, out_sizes=outs, ranks=ranks)
    y = rng.standard_normal((3, 5, 32)).astype(np.float32)
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    slot = rng.integers(-1, 2, (3, 5)).astype(np.int32)

    def lora(y, x, slot):
        return pk.lora_decode(y, x, case.pool, 0, case.a_pages, case.b_pages, case.ranks, case.scales, slot,
                              out_sizes=outs, implementation=implementation)

    batched = jax.jit(jax.vmap(lora))(y, x, slot)
    for i in range(3):
        assert relative_error(batched[i], lora(y[i], x[i], slot[i]), base=y[i]) < 1e-6

    seg = np.repeat([0, 1, -1], [10, 12, 2]).astype(np.int32)
    pos = np.r_[np.arange(10), np.arange(12), 0, 0].astype(np.int32)
    q = rng.standard_normal((2, 24, 2, 16)).astype(np.float32)

    def pre(q):
        return pk.prefill_attention(q, q[:, :1], q[:, 1:], seg, pos, sm_scale=0.25, implementation=implementation)

    batched = jax.jit(jax.vmap(pre))(q)
    for i in range(2):
        assert relative_error(batched[i], pre(q[i])) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["xla check_vma", "pallas nocheck", "lower"])
def test_shard_map_on_two_simulated_devices(mode):
    if mode == "lower" and jax.default_backend() == "gpu":
        # This check lowers the Triton kernels for CUDA from a CPU-only process, which a host with a GPU
        # plugin refuses ("No supported GPU devices found"); there every other test compiles and runs them.
        pytest.skip("lowering for CUDA from a CPU process is the CPU host's check")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    script = pathlib.Path(__file__).with_name("_shard_map_check.py")
    proc = subprocess.run([sys.executable, str(script), *mode.split()], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") >= 5, proc.stdout
