"""Thousands of registered adapters: lazy registration speed, the host-memory bound, background reads."""

import os
import shutil
import time

import jax.numpy as jnp
import numpy as np
import pytest

import slora_jax as sj
from slora_jax.adapters.paging import page_adapter
from slora_jax.adapters.peft import load_peft_adapter
from slora_jax.model.init import random_params
from slora_jax.model.random_checkpoint import write_random_adapter
from tests.bench.sim import TINY, Sim


def adapter_tree(root, n, ranks=(4, 8)):
    """n adapter folders; each is a copy of one of a few real adapters (config copied, weights hard-linked)."""
    real = [write_random_adapter(root / f"real{r}", TINY, rank=r, alpha=2 * r, target_modules=("q_proj", "v_proj"),
                                 seed=r) for r in ranks]
    out = []
    for i in range(n):
        src = real[i % len(real)]
        d = root / "all" / f"ad{i:04d}"
        d.mkdir(parents=True)
        shutil.copy(src / "adapter_config.json", d / "adapter_config.json")
        os.link(src / "adapter_model.safetensors", d / "adapter_model.safetensors")
        out.append(d)
    return out


@pytest.mark.slow
def test_registering_2000_adapter_folders_lazily_takes_seconds(tmp_path):
    folders = adapter_tree(tmp_path, 2000)
    engine = sj.Engine(TINY, random_params(TINY, jnp.float32), sj.EngineConfig(dtype="float32", num_pages=256))
    t0 = time.perf_counter()
    for d in folders:
        engine.load_adapter(d.name, d, lazy=True)
    elapsed = time.perf_counter() - t0
    assert elapsed < 15.0, elapsed  # ~1 s here; the bound leaves room for slow CI disks
    infos = engine.list_adapters()
    assert len(infos) == 2000 and all(i.location == "disk" for i in infos)
    assert engine.stats()["adapter_host_bytes"] == 0  # nothing read yet
    with pytest.raises(sj.AdapterError, match="already loaded"):
        engine.load_adapter("ad0000", folders[0], lazy=True)


def test_host_memory_stays_within_budget_and_reloads_are_exact(tmp_path):
    folders = adapter_tree(tmp_path, 12, ranks=(8,))
    one = page_adapter(load_peft_adapter(folders[0], TINY, 64, "x"), TINY,
                       Sim().layout, 64, np.float32)
    budget = 3 * one.nbytes
    sim = Sim(host_cache_bytes=budget, max_adapters_on_device=2)
    for d in folders:
        sim.store.register(d.name, d, lazy=True)
    for rnd in range(2):
        for d in folders:
            assert sim.store.acquire(d.name)
            sim.store.release(d.name)
            assert sim.store.host_bytes <= budget
            assert sum(1 for i in sim.store.list() if i.location != "disk") <= 3 + 2
    c = sim.store.counters
    assert c["host_loads"] == 24 and c["host_evictions"] >= 21  # every acquire past the budget re-read
    # What reaches the pool after a re-read is the adapter as read straight from its folder.
    for d in folders[:3]:
        sim.store.evict_all()
        n0 = len(sim.writes)
        assert sim.store.acquire(d.name)
        sim.store.release(d.name)
        ref = page_adapter(load_peft_adapter(d, TINY, 64, d.name), TINY, sim.layout, 64, np.float32)
        (_, pages, tiles), = sim.writes[n0:]
        np.testing.assert_array_equal(tiles, ref.tiles)
        assert len(pages) == ref.num_pages


def test_prefetch_reads_cold_adapters_from_disk_in_the_background(tmp_path):
    folders = adapter_tree(tmp_path, 3, ranks=(8,))
    sim = Sim(max_batch_size=4)
    for d in folders:
        sim.store.register(d.name, d, lazy=True)
    sim.add(4, 20, folders[0].name)
    sim.step()  # an idle engine: read and loaded on demand
    first = sim.store.load_log[0]
    assert not first.prefetched and first.read_s > 0
    cold = sim.add(4, 3, folders[1].name)
    sim.step()
    assert sim.store.reading(folders[1].name) and cold.metrics.first_token_time is None
    sim.store.wait_reads(timeout=30)
    for _ in range(3):
        sim.step()
    ev = [e for e in sim.store.load_log if e.name == folders[1].name][0]
    assert ev.prefetched and ev.hidden and ev.read_s == 0.0  # no disk time on the engine's thread
    assert cold.metrics.first_token_time is not None


def test_corrupt_lazy_adapter_fails_its_request_only(tmp_path):
    folders = adapter_tree(tmp_path, 2, ranks=(8,))
    (folders[1] / "adapter_model.safetensors").unlink()
    (folders[1] / "adapter_model.safetensors").write_bytes(b"garbage")
    sim = Sim(max_batch_size=4)
    for d in folders:
        sim.store.register(d.name, d, lazy=True)
    ok = sim.add(4, 8, folders[0].name)
    sim.step()
    bad = sim.add(4, 3, folders[1].name)
    for _ in range(4):
        sim.step()
        sim.store.wait_reads(timeout=30)
    sim.run()
    assert bad.finish_reason == "abort" and bad.error
    assert ok.finish_reason == "length"
