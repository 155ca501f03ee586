"""Step executables kept whole between starts (slora_jax.engine.executable_cache): an entry is found only by
the same program, runs with the weights it is given, and is never used after a setting that shapes the
program changed."""

import dataclasses
import os
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import slora_jax as sj
from slora_jax.engine import executable_cache
from slora_jax.engine.executable_cache import ExecutableCache
from slora_jax.model.checkpoint import param_shapes
from slora_jax.model.random_checkpoint import tiny_llama_config

CFG = tiny_llama_config()
PROMPTS = [[3, 4, 5], [7, 8, 9, 10]]


def weights(seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.standard_normal(s) * 0.3).astype(np.float32), param_shapes(CFG),
                        is_leaf=lambda x: isinstance(x, tuple))


def engine(seed, cache_dir, **conf):
    conf = dict(dtype="float32", num_pages=64, max_batch_size=2, max_prefill_tokens=16, max_model_len=32,
                compile_cache_dir=None if cache_dir is None else str(cache_dir)) | conf
    return sj.Engine(CFG, weights(seed), sj.EngineConfig(**conf))


def stored(cache_dir) -> list:
    return sorted((Path(cache_dir) / "executables").rglob("*.exe"))


def tokens(eng):
    return [o.token_ids for o in eng.generate(PROMPTS, sampling=sj.SamplingParams(max_tokens=5, ignore_eos=True))]


@pytest.mark.slow  # three engines, ~10 s
def test_an_entry_runs_with_the_weights_it_is_given(tmp_path):
    first = engine(0, tmp_path)
    assert {r["source"] for r in first.precompile(sampling=False)} == {"compiled"}
    other = engine(1, tmp_path)  # same shapes, other weights: the same programs
    records = other.precompile(sampling=False)
    assert records and {r["source"] for r in records} == {"executable cache"}
    reference = engine(1, None)  # no cache at all: compiled here from these weights
    assert tokens(other) == tokens(reference)
    assert tokens(other) != tokens(first)


@pytest.mark.slow  # two engines, ~8 s
def test_a_changed_setting_makes_other_programs(tmp_path, monkeypatch):
    engine(0, tmp_path).precompile(sampling=False)
    before = stored(tmp_path)
    # A kernel default changed at run time, as a benchmark variant does: nothing stored may be read back.
    from pallas_kernels.ops.lora_decode import pallas_triton

    monkeypatch.setattr(pallas_triton, "DEFAULT_GROUPING", "sort")
    changed = engine(0, tmp_path)
    assert {r["source"] for r in changed.precompile(sampling=False)} == {"compiled"}
    assert len(stored(tmp_path)) == 2 * len(before)


@pytest.mark.slow  # an engine of its own configuration, ~3 s
def test_the_program_statics_are_in_every_key(tmp_path, monkeypatch):
    """The kernel backend, TP size, sampling and LoRA groups shape a program without changing any shape: each
    key names the program's StepStatics whole (two engines differing only in backend once got one key)."""
    from slora_jax.model.llama import StepStatics

    seen = []
    real = ExecutableCache.key
    monkeypatch.setattr(ExecutableCache, "key", lambda self, program, *a: seen.append(program) or real(self, program, *a))
    engine(0, tmp_path).precompile(sampling=False)
    assert seen and all(isinstance(program[0], StepStatics) and program[0].backend == "xla" for program in seen)
    st, spec = seen[0]
    cache = ExecutableCache(tmp_path)
    variants = (st, dataclasses.replace(st, backend="pallas"), dataclasses.replace(st, tp=2),
                dataclasses.replace(st, greedy_only=not st.greedy_only))
    keys = {cache.key((s, spec), "structure", []) for s in variants}
    assert len(keys) == 4


@pytest.mark.slow  # two engines, ~8 s
def test_an_entry_that_does_not_fit_is_dropped_at_its_first_run(tmp_path, monkeypatch, caplog):
    reference = tokens(engine(0, None))
    engine(0, tmp_path).precompile(sampling=False)
    before = len(stored(tmp_path))
    wrong = jax.jit(lambda x: x + 1).lower(1.0).compile()  # loads fine, takes other arguments
    monkeypatch.setattr(ExecutableCache, "load", lambda self, key: wrong)
    eng = engine(0, tmp_path)
    assert {r["source"] for r in eng.precompile(sampling=False)} == {"executable cache"}
    with caplog.at_level("WARNING", logger="slora_jax.engine"):
        assert tokens(eng) == reference
    failed = caplog.text.count("did not take its arguments")
    assert failed >= 1 and len(stored(tmp_path)) == before - failed  # each entry that failed was deleted


@pytest.mark.slow  # two engines, ~6 s
def test_an_xla_without_the_fresh_compile_option_stores_nothing(tmp_path, monkeypatch, caplog):
    """Where the option that keeps a stored program apart from JAX's caches is refused, programs compile as
    usual and none is stored (a copy JAX's cache supplied would not run when read back)."""
    reference = tokens(engine(0, None))
    monkeypatch.setattr(executable_cache, "_FRESH_OPTIONS", {"xla_no_such_option_here": True})
    monkeypatch.setattr(ExecutableCache, "_option_refused", False)
    eng = engine(0, tmp_path)
    with caplog.at_level("WARNING", logger="slora_jax.compile_cache"):
        records = eng.precompile(sampling=False)
    assert records and {r["source"] for r in records} == {"compiled"}
    assert stored(tmp_path) == [] and caplog.text.count("step programs are not stored") == 1
    assert tokens(eng) == reference


@pytest.mark.slow  # two engines, ~6 s
def test_an_entry_that_fails_on_the_device_is_deleted(tmp_path, monkeypatch):
    """A stored program whose first run fails on the device (as one stored without its machine code did:
    "Function ... not found") raises, and its entry is gone, so the next start compiles it."""
    from slora_jax.engine import runner as runner_module

    engine(0, tmp_path).precompile(sampling=False)
    before = len(stored(tmp_path))
    eng = engine(0, tmp_path)
    assert {r["source"] for r in eng.precompile(sampling=False)} == {"executable cache"}

    def fail(out):
        raise RuntimeError("NOT_FOUND: Function wrapped_iota not found")

    monkeypatch.setattr(runner_module, "_wait", fail)
    with pytest.raises(Exception, match="wrapped_iota"):
        tokens(eng)
    assert len(stored(tmp_path)) == before - 1


def test_keys_name_every_part_and_refuse_unstable_ones(tmp_path):
    cache = ExecutableCache(tmp_path)
    args = [np.zeros((2, 3), np.float32)]
    k = cache.key(("decode", 4), "structure", args)
    assert k == cache.key(("decode", 4), "structure", [np.ones((2, 3), np.float32)])  # values are not part
    assert k != cache.key(("decode", 8), "structure", args)
    assert k != cache.key(("decode", 4), "other structure", args)
    assert k != cache.key(("decode", 4), "structure", [np.zeros((2, 4), np.float32)])
    assert k != cache.key(("decode", 4), "structure", [np.zeros((2, 3), np.int32)])
    assert cache.key(("decode", 4), object(), args) is None  # shown by address: differs at every start
    assert cache.load(None) is None and cache.load(k) is None
    cache.store(None, object())  # nothing to name it by: not stored
    assert list(tmp_path.iterdir()) == []


def test_off_without_a_folder_and_for_several_processes(tmp_path, monkeypatch):
    assert ExecutableCache.open(None) is None and ExecutableCache.open("") is None
    assert ExecutableCache.open(str(tmp_path)).folder.parent == tmp_path / "executables"
    monkeypatch.setattr(executable_cache.jax, "process_count", lambda: 2)
    assert ExecutableCache.open(str(tmp_path)) is None


def test_settings_and_source_hashes_follow_what_they_cover(monkeypatch):
    before = executable_cache.settings_hash()
    from pallas_kernels.ops.lora_decode import pallas_triton

    monkeypatch.setattr(pallas_triton, "DEFAULT_GROUPING", "sort")
    assert executable_cache.settings_hash() != before
    assert len(executable_cache.source_hash()) == 64


def test_other_versions_are_pruned(tmp_path):
    root = tmp_path / "executables"
    for i in range(6):  # six older versions, the newest last
        old = root / f"old{i}"
        old.mkdir(parents=True)
        (old / "x.exe").write_bytes(b"x")
        os.utime(old, (time.time() - 100 + i, time.time() - 100 + i))
    current = ExecutableCache.open(str(tmp_path)).folder
    (current / "stale.tmp").write_bytes(b"")
    os.utime(current / "stale.tmp", (time.time() - 7200, time.time() - 7200))
    ExecutableCache.open(str(tmp_path))
    kept = sorted(p.name for p in root.iterdir() if p != current)
    assert kept == [f"old{i}" for i in (3, 4, 5)][:executable_cache.KEEP_OTHER_VERSIONS]
    assert not (current / "stale.tmp").exists()
