"""The persistent compilation cache and the step executables kept beside it: a second start compiles and
traces no step program, a damaged entry is rebuilt, an entry is never used for another program, and the
folder can be moved or switched off. Each start is its own Python process, as a restart is."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# One engine start: a tiny model, its step programs compiled ahead; prints what the cache saw, counted by
# JAX's own monitoring events (a hit is a program loaded instead of compiled).
START = r"""
import json, sys
import numpy as np
import jax
counts = {}
jax.monitoring.register_event_listener(lambda event, **kw: counts.__setitem__(event, counts.get(event, 0) + 1))
import slora_jax as sj
from slora_jax.model.checkpoint import param_shapes
from slora_jax.model.random_checkpoint import tiny_llama_config
cfg = tiny_llama_config()
rng = np.random.default_rng(0)  # numpy weights: nothing is compiled before the engine starts
params = jax.tree.map(lambda s: (rng.standard_normal(s) * 0.1).astype(np.float32), param_shapes(cfg),
                      is_leaf=lambda x: isinstance(x, tuple))
conf = sj.EngineConfig(dtype="float32", num_pages=64, max_batch_size=2, max_prefill_tokens=16, max_model_len=32)
engine = sj.Engine(cfg, params, conf)
records = engine.precompile(sampling=False)
out = engine.generate([[3, 4, 5]], sampling=sj.SamplingParams(max_tokens=3, ignore_eos=True))
print(json.dumps({"programs": len(records), "tokens": out[0].token_ids,
                  "sources": sorted(r["source"] for r in records),
                  "cache_dir": jax.config.jax_compilation_cache_dir,
                  "requests": counts.get("/jax/compilation_cache/compile_requests_use_cache", 0),
                  "hits": counts.get("/jax/compilation_cache/cache_hits", 0),
                  "misses": counts.get("/jax/compilation_cache/cache_misses", 0)}))
"""


def start(home: Path) -> dict:
    env = dict(os.environ, HOME=str(home), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", START], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]) | {"stderr": res.stderr}


def entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith("-cache"))


@pytest.mark.slow  # six engine processes, ~20 s on two cores
def test_second_start_compiles_nothing_and_damaged_entries_are_rebuilt(tmp_path):
    folder = tmp_path / ".cache" / "slora-jax" / "xla"  # the default, under this HOME
    first = start(tmp_path)
    assert first["cache_dir"] == str(folder)
    assert first["programs"] >= 2 and first["requests"] > first["programs"]  # step programs and small ones
    assert first["sources"] == ["compiled"] * first["programs"]
    assert first["hits"] == 0 and first["misses"] == first["requests"]  # everything compiled
    # and written to JAX's cache, but for the step programs: those are stored whole, and compiled outside it
    written = entries(folder)
    assert len(written) == first["misses"] - first["programs"]
    stored = sorted((folder / "executables").rglob("*.exe"))
    assert len(stored) == first["programs"]

    # The step programs load whole (nothing traced, lowered or looked up in JAX's cache); the few small
    # programs around them come from JAX's cache.
    second = start(tmp_path)
    assert second["sources"] == ["executable cache"] * first["programs"]
    assert second["misses"] == 0 and second["hits"] == second["requests"] == first["requests"] - first["programs"]
    assert second["tokens"] == first["tokens"]
    assert entries(folder) == written and sorted((folder / "executables").rglob("*.exe")) == stored

    # Damage every entry of both: some truncated, some overwritten with garbage of the same length.
    for i, p in enumerate(written + stored):
        data = p.read_bytes()
        p.write_bytes(data[:len(data) // 3] if i % 2 else os.urandom(len(data)))
    third = start(tmp_path)  # starts, compiles again, and writes good entries in place of the damaged ones
    assert third["tokens"] == first["tokens"]
    assert third["sources"] == ["compiled"] * first["programs"]
    assert third["hits"] == 0 and third["misses"] == third["requests"]
    fourth = start(tmp_path)
    assert fourth["sources"] == ["executable cache"] * first["programs"] and fourth["misses"] == 0
    assert fourth["tokens"] == first["tokens"]

    # A new version of the code finds its own folder empty: the step programs are compiled and stored, and
    # what is stored runs at the next start (stored_programs_run_after_jax_cache_loads covers a program
    # that JAX's cache had supplied to the process).
    import shutil

    shutil.rmtree(folder / "executables")
    (folder / "executables").mkdir()
    fifth = start(tmp_path)
    assert fifth["sources"] == ["compiled"] * first["programs"] and fifth["tokens"] == first["tokens"]
    sixth = start(tmp_path)
    assert sixth["sources"] == ["executable cache"] * first["programs"]
    assert sixth["tokens"] == first["tokens"]


def test_folder_is_configurable_and_can_be_left_off(tmp_path):
    import jax

    from slora_jax.compile_cache import disable_compilation_cache, enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        assert enable_compilation_cache(None) is None and jax.config.jax_compilation_cache_dir == before
        assert enable_compilation_cache("") is None
        there = enable_compilation_cache(tmp_path / "a" / "b")
        assert there == tmp_path / "a" / "b" and there.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(there)
        blocked = tmp_path / "file"
        blocked.write_text("not a folder")
        assert enable_compilation_cache(blocked / "sub") is None  # cannot be created: no cache, no error
        disable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        if before is None:
            disable_compilation_cache()
        else:
            enable_compilation_cache(before)


def test_a_thread_can_keep_its_programs_out_of_the_cache(tmp_path):
    """``without_persistent_cache`` neither reads nor writes, in its thread only, although JAX decided at
    its first compilation that the cache is in use."""
    import jax
    import numpy as np

    from slora_jax.compile_cache import disable_compilation_cache, enable_compilation_cache, without_persistent_cache

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
    before = jax.config.jax_compilation_cache_dir
    try:
        folder = enable_compilation_cache(tmp_path / "c")
        x = np.arange(7, dtype=np.float32)  # numpy: nothing else compiles here
        with without_persistent_cache():
            jax.jit(lambda v: v * 3 + 1)(x)
        assert entries(folder) == []  # not written
        jax.jit(lambda v: v * 5 - 2)(x)
        assert len(entries(folder)) == 1  # the thread's next program is
        jax.clear_caches()  # the same program again: only the persistent cache can answer
        with without_persistent_cache():
            jax.jit(lambda v: v * 5 - 2)(x)
        assert hits == [] and len(entries(folder)) == 1
        jax.clear_caches()
        jax.jit(lambda v: v * 5 - 2)(x)
        assert hits == [1]  # read back outside the context
    finally:
        if before is None:
            disable_compilation_cache()
        else:
            enable_compilation_cache(before)


# One process's view of a program that JAX's persistent cache holds: compiled as the engine does on demand
# (from JAX's cache once a first process wrote it there), then compiled for the executable cache, serialized,
# loaded back and run.
ROUND_TRIP = r"""
import json, sys
import numpy as np
import jax, jax.numpy as jnp
from jax.experimental.serialize_executable import deserialize_and_load, serialize
from slora_jax.compile_cache import enable_compilation_cache, persistent_cache_hits
from slora_jax.engine.executable_cache import ExecutableCache
enable_compilation_cache(sys.argv[1])
persistent_cache_hits()  # counting from here
f = lambda x: jnp.cumsum(jnp.sin(x) * 3 + jnp.arange(x.shape[0], dtype=x.dtype))
x = np.linspace(0, 1, 1000, dtype=np.float32)
want = np.asarray(jax.jit(f)(x))  # on demand: from JAX's cache in the second process
hits = persistent_cache_hits()
exe, storable = ExecutableCache.compile(jax.jit(f).lower(x))
payload, i, o = serialize(exe)
got = np.asarray(deserialize_and_load(payload, i, o)(x))
print(json.dumps({"hits": hits, "storable": storable, "equal": bool(np.array_equal(got, want))}))
"""


@pytest.mark.slow  # two processes, ~8 s
def test_stored_programs_run_after_jax_cache_loads(tmp_path):
    """On the CPU a program JAX's persistent cache supplied serializes without its machine code (its copy
    fails at run time, "Function ... not found"), and JAX's in-memory cache hands that same copy back to a
    later compile of the program. What the executable cache stores is compiled apart from both, and runs."""
    root = Path(__file__).resolve().parents[1]
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(tmp_path / "xla")], cwd=root, capture_output=True,
                             text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert runs[0]["hits"] == 0 and runs[1]["hits"] >= 1  # the second process had it from JAX's cache
    assert all(r["storable"] and r["equal"] for r in runs)
