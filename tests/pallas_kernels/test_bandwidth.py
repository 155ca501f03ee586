"""benchmarks/bandwidth.py: the copy kernel copies, and the reference is the fastest candidate it names."""

import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import bandwidth  # noqa: E402


def test_pallas_copy_kernel_copies_every_element():
    rng = np.random.default_rng(0)
    for dtype in (jnp.bfloat16, jnp.uint32):
        n = 3 * bandwidth._COPY_BLOCK
        x = jnp.asarray(rng.integers(0, 1000, n)).astype(dtype)
        out = bandwidth._pallas_copy(x, interpret=True)
        assert out.dtype == x.dtype and out.shape == x.shape
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_reference_is_the_fastest_candidate():
    bw = bandwidth.measure_copy_bandwidth(1 << 20, target_s=0.002, with_pallas=False)
    assert set(bw.candidates) == {"xla_add_bf16", "xla_add_bf16_2d", "xla_add_u32"} and not bw.failed
    assert bw.method in bw.candidates and bw.bytes_per_s == max(bw.candidates.values()) > 0
    assert bw.nbytes == 1 << 20
    d = bw.as_dict()
    assert d["copy_bandwidth_GBps"] == bw.bytes_per_s / 1e9 and d["copy_bandwidth_method"] == bw.method
    assert bw.method in bw.describe()


def test_sizes_round_to_whole_blocks_and_the_h200_peak_is_known():
    bw = bandwidth.measure_copy_bandwidth(100_000, target_s=0.001, with_pallas=False)
    assert bw.nbytes == 65536  # rounded down to whole 2-D rows and Pallas blocks
    assert bandwidth.HBM_PEAK_BYTES_PER_S["NVIDIA H200"] == 4.8e12
