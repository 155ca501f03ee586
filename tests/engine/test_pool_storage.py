"""A bfloat16 engine on a CPU: its pool holds bf16 bits as uint16, so no step or adapter load makes a pass over
the whole pool (XLA:CPU widens bf16 writes into one), its steps cost the same at any pool size, and it
generates what it generated with a bf16-stored pool."""

import time

import jax
import numpy as np
import pytest

import slora_jax as sj
from pallas_kernels import pool_storage
from pallas_kernels.testing import pool_sized_passes
from slora_jax.engine import runner as runner_mod
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter, write_random_checkpoint
from tests.engine.steps import compiled_steps

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the uint16 storage is the CPU's")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAMPLING = sj.SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57]]
ADAPTERS = ["qv", None, "all"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    cfg = tiny_llama_config()
    model = write_random_checkpoint(root / "model", cfg, seed=1, std=0.08)
    adapters = {"qv": write_random_adapter(root / "qv", cfg, rank=8, alpha=16, seed=3, init_scale=0.3),
                "all": write_random_adapter(root / "all", cfg, rank=16, alpha=32, target_modules=ALL, seed=4,
                                            init_scale=0.3)}
    return model, adapters


def make_engine(tiny, **kw):
    model, adapters = tiny
    kw.setdefault("kernel_backend", "xla")
    eng = sj.Engine.from_pretrained(model, config=sj.EngineConfig(dtype="bfloat16", **kw))
    for name, d in adapters.items():
        eng.load_adapter(name, d)
    return eng


def bf16_stored(monkeypatch):
    """Make engines built from now on store a bf16 pool as bf16, as they did before the uint16 storage."""
    monkeypatch.setattr(pool_storage, "storage_dtype", lambda dtype, backend=None: jax.numpy.dtype(dtype))


def step_passes(eng) -> dict:
    """{mode: pool-sized passes in its compiled step} over the steps of one generate, and the adapter page
    write's program under "write_pages"."""
    steps = compiled_steps(eng, lambda: eng.generate(PROMPTS, adapters=ADAPTERS, sampling=SAMPLING))
    pool = eng.runner.pool
    found = {}
    for mode, hlo in steps:
        found.setdefault(mode, []).extend(pool_sized_passes(hlo, pool.shape, pool.dtype))
    L, _, R, W = pool.shape
    tiles = jax.numpy.zeros((L, 4, R, W), jax.numpy.bfloat16)
    hlo = runner_mod._write_pages.lower(pool, jax.numpy.arange(4, dtype=jax.numpy.int32), tiles).compile().as_text()
    found["write_pages"] = pool_sized_passes(hlo, pool.shape, pool.dtype)
    return found


@pytest.mark.slow  # compiles bfloat16 step programs, ~20 s cold on two cores
def test_no_step_or_adapter_write_makes_a_pass_over_the_pool(tiny, monkeypatch):
    eng = make_engine(tiny, num_pages=1000)
    assert eng.runner.pool.dtype == np.uint16
    found = step_passes(eng)
    assert set(found) >= {"mixed", "decode", "write_pages"}
    assert all(not v for v in found.values()), {k: v[:2] for k, v in found.items()}
    eng.close()
    # The same engine with its pool stored as bf16 widens it on every write: what the check above rules out.
    bf16_stored(monkeypatch)
    eng = make_engine(tiny, num_pages=1000)
    assert eng.runner.pool.dtype == jax.numpy.bfloat16
    found = step_passes(eng)
    assert found["decode"] and found["write_pages"]
    eng.close()


@pytest.mark.slow  # compiles bfloat16 step programs, ~20 s cold on two cores
def test_tokens_and_logprobs_equal_those_of_a_bf16_stored_pool(tiny, monkeypatch):
    eng = make_engine(tiny, num_pages=256)
    got = eng.generate(PROMPTS, adapters=ADAPTERS, sampling=SAMPLING)
    eng.close()
    bf16_stored(monkeypatch)
    eng = make_engine(tiny, num_pages=256)
    want = eng.generate(PROMPTS, adapters=ADAPTERS, sampling=SAMPLING)
    eng.close()
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    np.testing.assert_allclose([o.logprobs for o in got], [o.logprobs for o in want], rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # compiles bfloat16 step programs, ~7 s cold on two cores
def test_pallas_asked_for_runs_xla_and_says_so(tiny, caplog):
    with caplog.at_level("WARNING", logger="slora_jax.engine"):
        eng = make_engine(tiny, num_pages=256, kernel_backend="pallas")
    assert eng.kernel_backend == "xla" and eng.runner.pool.dtype == np.uint16
    assert any("uint16 bits" in r.message and "XLA path" in r.message for r in caplog.records)
    got = eng.generate(PROMPTS, adapters=ADAPTERS, sampling=SAMPLING)
    eng.close()
    eng = make_engine(tiny, num_pages=256)
    want = eng.generate(PROMPTS, adapters=ADAPTERS, sampling=SAMPLING)
    eng.close()
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


@pytest.mark.slow  # timing; the compiled-program check above is the robust form of the same property
def test_step_time_does_not_grow_with_the_pool(tiny):
    """32x the pages: a bf16-stored pool took 40x the time here (0.18 s -> 7.5 s at 16x, benchmarks/NOTES.md)."""
    times = {}
    for pages in (1024, 32768):
        eng = make_engine(tiny, num_pages=pages)
        eng.generate(PROMPTS, adapters=ADAPTERS, sampling=SAMPLING)  # compiles
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            eng.generate(PROMPTS, adapters=ADAPTERS, sampling=SAMPLING)
            best = min(best, time.perf_counter() - t0)
        times[pages] = best
        eng.close()
    assert times[32768] < 3 * times[1024] + 0.05, times
