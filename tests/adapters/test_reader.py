"""The adapter read path: straight-to-tiles reads against the float32 loader + page_adapter, parallel reads,
failures in the middle of a read, eviction and unloading while a read is in flight, files that vanish after
registration, and the read speed against numpy reading the same files."""

import shutil
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from slora_jax.adapters import reader as reader_mod
from slora_jax.adapters.paging import AdapterTables, canonical_tiles, page_adapter
from slora_jax.adapters.peft import load_peft_adapter
from slora_jax.adapters.reader import plan_adapter, read_paged_adapter
from slora_jax.adapters.store import AdapterStore
from slora_jax.config import EngineConfig
from slora_jax.errors import AdapterError
from slora_jax.memory.host_arena import HostArena, _align
from slora_jax.memory.pool import PoolLayout, UnifiedPagePool
from slora_jax.model.hf_config import load_model_config
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter
from tests.bench.sim import TINY, Sim

BF16 = np.dtype(ml_dtypes.bfloat16)


def reference(adapter_dir, cfg, layout, dtype):
    """The adapter as the float32 loader reads it, cut into pages by page_adapter."""
    return page_adapter(load_peft_adapter(adapter_dir, cfg, 64, "ref"), cfg, layout, 64, dtype)


def assert_same_paged(got, ref):
    """``got`` (B's pages possibly transposed) holds, once turned round, exactly ``ref``'s tiles."""
    assert got.num_pages == ref.num_pages
    assert got.tiles.dtype == ref.tiles.dtype and got.tiles.shape == ref.tiles.shape
    tiles = np.asarray(canonical_tiles(got.tiles, got.transposed))
    np.testing.assert_array_equal(tiles.view(np.uint8), ref.tiles.view(np.uint8))  # bit for bit
    assert set(got.groups) == set(ref.groups)
    for g in ref.groups:
        for field in ("a_idx", "b_idx", "ranks", "scales"):
            np.testing.assert_array_equal(getattr(got.groups[g], field), getattr(ref.groups[g], field))


def tensor_bytes(adapter_dir) -> int:
    from safetensors.numpy import load_file

    return sum(t.nbytes for t in load_file(str(adapter_dir / "adapter_model.safetensors")).values())


# ------------------------------------------------------------------------------------------ exact reads


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_peft_made_adapters_read_like_the_float32_loader(llama_gqa_dir, llama_adapters, dtype):
    cfg = load_model_config(llama_gqa_dir)
    layout = PoolLayout(cfg.num_layers, 64, 16, cfg.kv_size)
    for name, d in llama_adapters.items():
        plan = plan_adapter(d, cfg, layout, 64)
        got, nbytes = read_paged_adapter(plan, cfg, layout, 64, dtype)
        assert_same_paged(got, reference(d, cfg, layout, dtype))
        assert nbytes == tensor_bytes(d), name


@pytest.mark.parametrize("file_dtype,engine_dtype", [("float32", BF16), ("bfloat16", BF16), ("float16", np.float32),
                                                     ("bfloat16", np.float32), ("float32", np.float16)])
def test_odd_shapes_dtypes_and_layers(tmp_path, file_dtype, engine_dtype):
    # Widths that are not a multiple of the page width, ranks that are not a multiple of the page rows,
    # layers left out, and every module.
    cfg = tiny_llama_config(hidden_size=80, intermediate_size=136, num_layers=3)
    layout = PoolLayout(cfg.num_layers, 64, 16, cfg.kv_size)
    d = write_random_adapter(tmp_path / "a", cfg, rank=20, seed=3, dtype=file_dtype, layers_to_transform=[0, 2],
                             target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"))
    got, _ = read_paged_adapter(plan_adapter(d, cfg, layout, 64), cfg, layout, 64, engine_dtype)
    assert_same_paged(got, reference(d, cfg, layout, engine_dtype))
    assert not got.tiles[1].any()  # the layer left out is all zero


def test_reads_in_small_batches_and_checks_in_small_chunks(tmp_path, monkeypatch):
    # Buffers far smaller than a module's tensors: every batch and check boundary is crossed.
    from safetensors.numpy import load_file, save_file

    monkeypatch.setattr(reader_mod, "_BATCH_BYTES", 3000)
    monkeypatch.setattr(reader_mod, "_CHECK_BYTES", 256)
    cfg = tiny_llama_config(num_layers=5)
    layout = PoolLayout(cfg.num_layers, 64, 16, cfg.kv_size)
    d = write_random_adapter(tmp_path / "a", cfg, rank=12, seed=4, dtype="bfloat16",
                             target_modules=("q_proj", "v_proj", "down_proj"), layers_to_transform=[0, 1, 3, 4])
    got, _ = read_paged_adapter(plan_adapter(d, cfg, layout, 64), cfg, layout, 64, BF16)
    assert_same_paged(got, reference(d, cfg, layout, BF16))
    f = d / "adapter_model.safetensors"
    tensors = load_file(str(f))
    bad = "base_model.model.model.layers.4.mlp.down_proj.lora_A.weight"
    tensors[bad][-1, -1] = np.inf  # the last value of the last chunk
    save_file(tensors, str(f))
    with pytest.raises(AdapterError, match=f"{bad}.*non-finite"):
        read_paged_adapter(plan_adapter(d, cfg, layout, 64), cfg, layout, 64, BF16)


def test_plan_knows_the_size_without_reading(tmp_path, llama_gqa_dir, llama_adapters):
    cfg = load_model_config(llama_gqa_dir)
    layout = PoolLayout(cfg.num_layers, 64, 16, cfg.kv_size)
    for d in llama_adapters.values():
        plan = plan_adapter(d, cfg, layout, 64)
        ref = reference(d, cfg, layout, np.float32)
        lw = load_peft_adapter(d, cfg, 64, "x")
        assert plan.num_pages == ref.num_pages
        assert plan.targets == lw.target_modules and plan.rank == lw.rank


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_named(tmp_path, value):
    from safetensors.numpy import load_file, save_file

    cfg = tiny_llama_config()
    layout = PoolLayout(cfg.num_layers, 64, 16, cfg.kv_size)
    d = write_random_adapter(tmp_path / "a", cfg, rank=8, dtype="bfloat16")
    f = d / "adapter_model.safetensors"
    tensors = load_file(str(f))
    bad = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[bad][3, 2] = value
    save_file(tensors, str(f))
    with pytest.raises(AdapterError, match=f"{bad}.*non-finite"):
        read_paged_adapter(plan_adapter(d, cfg, layout, 64), cfg, layout, 64, np.float32)


@pytest.mark.parametrize("file_dtype,value,engine_dtype", [("float64", 1e300, np.float32),
                                                         ("float32", 1e5, np.float16),
                                                         ("bfloat16", -7e4, np.float16)])
def test_values_past_the_engine_dtypes_range_are_named(tmp_path, file_dtype, value, engine_dtype):
    """A finite value that the cast to the pool's format would turn into Inf: both loaders refuse it by name."""
    from safetensors.numpy import load_file, save_file

    cfg = tiny_llama_config()
    layout = PoolLayout(cfg.num_layers, 64, 16, cfg.kv_size)
    d = write_random_adapter(tmp_path / "a", cfg, rank=8, dtype="float32")
    f = d / "adapter_model.safetensors"
    file_type = {"float64": np.float64, "float32": np.float32, "bfloat16": BF16}[file_dtype]
    tensors = {k: v.astype(file_type) for k, v in load_file(str(f)).items()}
    bad = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[bad][2, 3] = value
    save_file(tensors, str(f))
    name = np.dtype(engine_dtype).name
    with pytest.raises(AdapterError, match=f"{bad}.*outside {name}'s range"):
        read_paged_adapter(plan_adapter(d, cfg, layout, 64), cfg, layout, 64, engine_dtype)
    with pytest.raises(AdapterError, match=f"{bad}.*outside {name}'s range"):
        load_peft_adapter(d, cfg, 64, "x", dtype=name)
    # In range for a wider engine dtype: read as usual.
    if engine_dtype == np.float16:
        read_paged_adapter(plan_adapter(d, cfg, layout, 64), cfg, layout, 64, np.float32)


def test_truncated_file_is_refused_before_reading(tmp_path):
    cfg = tiny_llama_config()
    layout = PoolLayout(cfg.num_layers, 64, 16, cfg.kv_size)
    d = write_random_adapter(tmp_path / "a", cfg, rank=8)
    plan = plan_adapter(d, cfg, layout, 64)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="truncated"):
        read_paged_adapter(plan, cfg, layout, 64, np.float32)


@pytest.mark.parametrize("tag", ["BF16", "F16"])
def test_finite_check_on_every_16_bit_pattern(tag):
    """The integer check agrees with np.isfinite on each of the 65536 values, alone and among finite ones."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    floats = bits.view(reader_mod.SAFETENSORS_NUMPY[tag]).astype(np.float32)
    finite = np.isfinite(floats)
    got = np.array([reader_mod._finite_error(bits[i:i + 1].view(np.uint8), tag) for i in range(bits.size)])
    np.testing.assert_array_equal(got, ~finite)
    block = np.zeros(4096, np.uint16)  # zeros, with one value put at the end
    for b in (0x7F80, 0xFF80, 0x7FC1, 0xFFFF, 0x7C00, 0xFC00, 0x7F7F, 0xFF7F, 0x7BFF, 0xFBFF, 0x8000):
        block[-1] = b
        assert reader_mod._finite_error(block.view(np.uint8), tag) == (not finite[b]), hex(b)
    assert not reader_mod._finite_error(np.zeros(0, np.uint8), tag)


@pytest.mark.parametrize("tag,dtype", [("F32", np.float32), ("F64", np.float64)])
def test_finite_check_on_wide_floats(tag, dtype, monkeypatch):
    monkeypatch.setattr(reader_mod, "_CHECK_BYTES", 64)  # across chunk boundaries too
    info = np.finfo(dtype)
    finite = np.array([0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny, info.smallest_subnormal,
                       -info.smallest_subnormal, 1.5, -2.5], dtype)
    assert not reader_mod._finite_error(np.tile(finite, 7).view(np.uint8), tag)
    ubits = np.dtype(f"u{np.dtype(dtype).itemsize}")
    quiet_negative_nan = np.array([-np.nan], dtype).view(ubits) | 1  # a NaN with its sign bit and a payload
    for bad in (np.array([np.inf, -np.inf, np.nan], dtype), quiet_negative_nan.view(dtype)):
        for v in bad:
            values = np.tile(finite, 7)
            values[-3] = v
            assert reader_mod._finite_error(values.view(np.uint8), tag), v


def test_a_reused_buffer_holds_only_the_adapter(tmp_path):
    """Tiles built in a reused buffer full of another adapter's bytes: the padding (ranks below a page's
    rows, widths below a page's, layers left out) is zeroed, whatever fills it completely is not."""
    cfg = tiny_llama_config(hidden_size=80, intermediate_size=136, num_layers=3)
    layout = PoolLayout(cfg.num_layers, 64, 16, cfg.kv_size)
    odd = write_random_adapter(tmp_path / "odd", cfg, rank=20, seed=3, dtype="bfloat16", layers_to_transform=[0, 2],
                               target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"))
    even = write_random_adapter(tmp_path / "even", cfg, rank=32, seed=5, dtype="bfloat16",
                                target_modules=("k_proj", "v_proj"))  # k/v: 32 wide, one page wide
    every_layer = write_random_adapter(tmp_path / "every", cfg, rank=20, seed=7, dtype="bfloat16",
                                       target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"))
    out = np.full(1 << 20, 0xFF, np.uint8)  # NaN bits everywhere
    for d in (odd, even, every_layer, odd, every_layer, even):
        got, _ = read_paged_adapter(plan_adapter(d, cfg, layout, 64), cfg, layout, 64, BF16, out)
        assert np.shares_memory(got.tiles, out)
        assert_same_paged(got, reference(d, cfg, layout, BF16))
    # Widths that are whole pages (64 and 32 wide pages of 32) and ranks of whole page rows: nothing to zero.
    cfg = tiny_llama_config(num_layers=3)
    layout = PoolLayout(cfg.num_layers, 64, 16, cfg.kv_size)
    full = write_random_adapter(tmp_path / "full", cfg, rank=32, seed=6, dtype="bfloat16",
                                target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"))
    out.fill(0xFF)
    got, _ = read_paged_adapter(plan_adapter(full, cfg, layout, 64), cfg, layout, 64, BF16, out)
    assert np.shares_memory(got.tiles, out)
    assert_same_paged(got, reference(full, cfg, layout, BF16))


def test_tensor_parallel_tiles_read_like_page_adapter(tmp_path):
    """Each device's columns of A^T and B in its columns of the pages, as page_adapter cuts them."""
    cfg = tiny_llama_config(num_layers=3)
    layout = PoolLayout(cfg.num_layers, 64, 16, cfg.kv_size, shards=2)
    for rank, file_dtype in ((16, "bfloat16"), (20, "float32")):
        d = write_random_adapter(tmp_path / f"r{rank}", cfg, rank=rank, seed=rank, dtype=file_dtype,
                                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"))
        for out in (None, np.full(1 << 20, 0xFF, np.uint8)):
            got, _ = read_paged_adapter(plan_adapter(d, cfg, layout, 64), cfg, layout, 64, BF16, out)
            assert_same_paged(got, reference(d, cfg, layout, BF16))


# ------------------------------------------------------------------------------------------ the store


def make_store(cfg=TINY, workers=2, dtype=np.float32, arena_bytes=64 << 20, **econf):
    """A store whose staging is the identity (numpy) and whose host tier is an arena of ``arena_bytes``, as
    the engine's (None: private copies, as where no arena can be made)."""
    econf = EngineConfig(num_pages=256, **econf)
    layout = PoolLayout(cfg.num_layers, 256, econf.page_rows, cfg.kv_size)
    pool = UnifiedPagePool(layout)
    tables = AdapterTables(cfg, layout, econf.max_adapters_on_device, econf.max_lora_rank)
    writes = []
    store = AdapterStore(cfg, econf, layout, pool, tables, lambda p, t: writes.append((p, t)), dtype,
                         stage=lambda tiles: tiles, arena=None if arena_bytes is None else HostArena(arena_bytes))
    store._read_workers = workers
    return store, writes


def folders(root, n, rank=8, cfg=TINY, **kw):
    return [write_random_adapter(root / f"ad{i}", cfg, rank=rank, seed=i, **kw) for i in range(n)]


def test_reads_run_in_parallel_off_the_calling_thread(tmp_path, monkeypatch):
    dirs = folders(tmp_path, 4)
    store, _ = make_store(workers=2)
    for d in dirs:
        store.register(d.name, d, lazy=True)
    # Two reads must be inside read_paged_adapter at once for either to go on: serial reads time out.
    barrier = threading.Barrier(2, timeout=20)
    threads = set()
    real = reader_mod.read_paged_adapter

    def gated(*a, **k):
        threads.add(threading.get_ident())
        barrier.wait()
        return real(*a, **k)

    monkeypatch.setattr("slora_jax.adapters.store.read_paged_adapter", gated)
    assert store.read_ahead([d.name for d in dirs]) == 4
    assert all(store.reading(d.name) for d in dirs)
    store.wait_reads(timeout=60)
    store.begin_step(1)
    assert threading.get_ident() not in threads and len(threads) == 2
    c = store.counters
    assert c["reads"] == 4 and c["read_failures"] == 0 and c["host_loads"] == 4
    assert c["read_bytes"] == sum(tensor_bytes(d) for d in dirs)
    assert c["load_read_s"] > c["read_wall_s"] > 0  # overlapping reads: more read seconds than wall seconds
    assert c["read_gbps"] == pytest.approx(c["read_bytes"] / c["read_wall_s"] / 1e9)
    for d in dirs:
        assert store.info(d.name).location == "host"
        assert store.acquire(d.name)
    layout = store.layout
    for d in dirs:  # what reached the host tier is the adapter as the float32 loader reads it
        assert_same_paged(store._host[d.name], reference(d, TINY, layout, np.float32))


def test_read_ahead_stays_within_half_the_host_cache(tmp_path):
    dirs = folders(tmp_path, 6)
    store, _ = make_store()
    for d in dirs:
        store.register(d.name, d, lazy=True)
    one = store._plan_bytes(store._records[dirs[0].name])
    store.econf = EngineConfig(num_pages=256, host_cache_bytes=5 * one)  # half of it holds 2 reads, not 3
    assert store.read_ahead([d.name for d in dirs]) == 2
    assert [store.reading(d.name) for d in dirs] == [True, True, False, False, False, False]
    store.wait_reads(timeout=60)


def test_failure_in_the_middle_of_a_read_fails_that_adapter_only(tmp_path, monkeypatch):
    good, bad = folders(tmp_path, 2, rank=16)
    sim = Sim(max_batch_size=4)
    sim.store.register(good.name, good, lazy=True)
    sim.store.register(bad.name, bad, lazy=True)
    real = reader_mod.pread_into
    calls = {"n": 0}

    def truncating(fd, buf, offset, path, error):
        # The file is cut short after the first reads of its data, as if replaced while being read.
        if "ad1" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:
                with open(path, "r+b") as f:
                    f.truncate(offset + 10)
        return real(fd, buf, offset, path, error)

    monkeypatch.setattr(reader_mod, "pread_into", truncating)
    ok = sim.add(4, 6, good.name)
    sim.step()
    failing = sim.add(4, 3, bad.name)
    for _ in range(3):
        sim.step()
        sim.store.wait_reads(timeout=60)
    sim.run()
    assert calls["n"] >= 2
    assert failing.finish_reason == "abort" and "ended at byte" in failing.error and bad.name in failing.error
    assert ok.finish_reason == "length" and len(ok.output) == 6
    assert sim.store.failed(bad.name) and sim.store.counters["read_failures"] == 1
    later = sim.add(4, 3, bad.name)  # a request arriving after the failure learns why, without a new read
    sim.run()
    assert later.finish_reason == "abort" and "could not be read" in later.error and "unload it" in later.error
    assert sim.store.counters["reads"] == 2  # the good adapter and the failed one, not read again
    sim.pool.check_invariants()
    # Unload, fix, load again: it serves.
    monkeypatch.setattr(reader_mod, "pread_into", real)
    sim.store.unregister(bad.name)
    write_random_adapter(bad, TINY, rank=16, seed=1)
    sim.store.register(bad.name, bad, lazy=True)
    again = sim.add(4, 3, bad.name)
    sim.run()
    assert again.finish_reason == "length"


def test_file_deleted_after_registration(tmp_path):
    good, gone = folders(tmp_path, 2)
    sim = Sim(max_batch_size=4)
    for d in (good, gone):
        sim.store.register(d.name, d, lazy=True)
    shutil.rmtree(gone)
    ok = sim.add(4, 5, good.name)
    sim.step()
    lost = sim.add(4, 3, gone.name)
    for _ in range(3):
        sim.step()
        sim.store.wait_reads(timeout=60)
    sim.run()
    assert lost.finish_reason == "abort"
    assert "no longer exists" in lost.error and "after the adapter was registered" in lost.error
    assert ok.finish_reason == "length"
    # On an idle store the first use says the same, on the caller's thread.
    store, _ = make_store()
    d = folders(tmp_path / "b", 1)[0]
    store.register("x", d, lazy=True)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no longer exists"):
        store.acquire("x")


def _gate_reads(monkeypatch, names):
    """Hold the reads of ``names`` until the returned event is set; returns (started event, release event)."""
    started, release = threading.Event(), threading.Event()
    real = reader_mod.read_paged_adapter

    def gated(plan, *a, **k):
        if any(plan.adapter_dir.endswith(n) for n in names):
            started.set()
            assert release.wait(30)
        return real(plan, *a, **k)

    monkeypatch.setattr("slora_jax.adapters.store.read_paged_adapter", gated)
    return started, release


def test_unload_while_a_read_is_in_flight_drops_its_result(tmp_path, monkeypatch):
    old, new = folders(tmp_path, 2, rank=8)
    store, _ = make_store()
    store.register("x", old, lazy=True)
    started, release = _gate_reads(monkeypatch, ["ad0"])
    store.read_ahead(["x"])
    assert started.wait(30) and store.reading("x")
    store.unregister("x")
    store.register("x", new, lazy=True)  # same name, another folder, while the old read still runs
    release.set()
    store.wait_reads(timeout=60)
    time.sleep(0.05)
    store.begin_step(1)
    assert store.host_bytes == 0 and store.info("x").location == "disk"  # the stale read was dropped
    assert store.acquire("x")
    assert_same_paged(store._host["x"], reference(new, TINY, store.layout, np.float32))


def test_eviction_while_a_read_is_in_flight(tmp_path, monkeypatch):
    a, b, c = folders(tmp_path, 3, rank=8)
    store, _ = make_store(max_adapters_on_device=1)
    for d in (a, b, c):
        store.register(d.name, d, lazy=True)
    one = store._plan_bytes(store._records[a.name])
    store.econf = EngineConfig(num_pages=256, max_adapters_on_device=1, host_cache_bytes=2 * one)
    assert store.acquire(a.name)  # on the device, in use
    store.release(a.name)
    started, release = _gate_reads(monkeypatch, [c.name])
    store.read_ahead([c.name])
    assert started.wait(30)
    # While c is being read: b takes a's device slot (a is evicted from the device) and joins the host tier.
    assert store.acquire(b.name)
    assert store.info(a.name).location == "host" and store.reading(c.name)
    release.set()
    store.wait_reads(timeout=60)
    store.begin_step(1)
    # c's arrival evicts the least recently used host copy (a); b stays on the device and usable.
    assert store.info(c.name).location == "host" and store.info(a.name).location == "disk"
    assert store.info(b.name).location == "device" and store.host_bytes <= 2 * one
    store.release(b.name)
    assert store.acquire(c.name)  # b is evicted from the device for c
    assert_same_paged(store._host[c.name], reference(c, TINY, store.layout, np.float32))
    assert store.acquire(a.name) is False  # one slot, held by c (a was read from disk again meanwhile)
    store.release(c.name)
    assert store.acquire(a.name)
    store.pool.check_invariants()


# ------------------------------------------------------------------------------------------ speed


@pytest.mark.slow  # timing over 150 reads of 50 adapters (>300 MB), ~7 s
def test_eager_registration_reads_near_numpy_speed(tmp_path):
    """50 rank-64 adapters of a 1024-hidden, 8-layer model (bf16 files, bf16 engine): registering them
    eagerly takes at most 3x what numpy takes to read the same files into arrays it keeps (as registering
    keeps the adapters: both pay for memory new to the process, none is freed during the timing). Each
    adapter is timed both ways back to back, three times, and its best time of each way counts: on a
    shared machine a time slice lost to another process then spoils one sample, not a whole pass."""
    cfg = tiny_llama_config(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16,
                            num_kv_heads=4, head_dim=64, vocab_size=1024)
    dirs = folders(tmp_path, 50, rank=64, cfg=cfg, dtype="bfloat16",
                   target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    files = [d / "adapter_model.safetensors" for d in dirs]
    store, _ = make_store(cfg=cfg, dtype=BF16, host_cache_bytes=8 << 30)
    for f in files:
        f.read_bytes()  # both timings start from the page cache
    numpy_s = np.full((3, len(dirs)), np.inf)
    register_s = np.full((3, len(dirs)), np.inf)
    kept = []  # nothing is freed until the end: neither side reuses memory the other side freed
    for rep in range(3):
        for i, (d, f) in enumerate(zip(dirs, files)):
            t0 = time.perf_counter()
            kept.append(np.fromfile(f, np.uint8))
            t1 = time.perf_counter()
            store.register(f"r{rep}-{d.name}", d)
            t2 = time.perf_counter()
            numpy_s[rep, i], register_s[rep, i] = t1 - t0, t2 - t1
    total = sum(a.nbytes for a in kept[:len(files)])
    del kept
    assert total > 300e6
    assert store.counters["reads"] == 150 and store.counters["read_bytes"] >= 150 * (total / 50) * 0.99
    best_numpy, best_register = numpy_s.min(axis=0).sum(), register_s.min(axis=0).sum()
    ratio = best_register / best_numpy
    assert ratio <= 3.0, (f"eager registration {best_register:.3f}s vs numpy {best_numpy:.3f}s: {ratio:.2f}x "
                          f"(passes: {register_s.sum(axis=1)}, {numpy_s.sum(axis=1)})")


@pytest.mark.slow  # compiles an engine, ~6 s
def test_engine_stats_count_background_reads(tmp_path):
    import jax.numpy as jnp

    import slora_jax as sj
    from slora_jax.model.init import random_params

    d = folders(tmp_path, 1, rank=8)[0]
    engine = sj.Engine(TINY, random_params(TINY, jnp.float32), sj.EngineConfig(dtype="float32", num_pages=256))
    engine.load_adapter("a", d, lazy=True)
    assert engine.list_adapters()[0].rank == 8  # known from the config before any read
    before = engine.stats()
    assert before["adapter_reads"] == 0 and before["adapter_load_read_s"] == 0.0
    out = engine.generate([[3, 4, 5]], adapters="a", sampling=sj.SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out[0].token_ids) == 2
    s = engine.stats()
    assert s["adapter_reads"] == 1 and s["adapter_read_bytes"] == tensor_bytes(d)
    assert s["adapter_load_read_s"] > 0 and s["adapter_read_wall_s"] > 0 and s["adapter_read_gbps"] > 0
    # The host tier is the shared arena, not registered for DMA off a GPU, and the read went into it.
    assert s["host_arena_bytes"] > 0 and s["host_arena_registered"] is False
    assert np.shares_memory(engine.adapters._host["a"].tiles, engine.adapters._arena.buffer)
    engine.close()


def test_a_request_waiting_for_its_read_does_not_hold_back_the_batch(tmp_path, monkeypatch):
    warm, cold = folders(tmp_path, 2)
    sim = Sim(max_batch_size=8)
    sim.store.register(warm.name, warm)  # read now: in host memory
    sim.store.register(cold.name, cold, lazy=True)
    started, release = _gate_reads(monkeypatch, [cold.name])
    first = sim.add(4, 30, warm.name)
    sim.step()
    blocked = sim.add(4, 3, cold.name)
    behind = [sim.add(4, 3, warm.name) for _ in range(3)]  # queued after the cold one
    for _ in range(6):
        sim.step()
    assert started.is_set() and sim.store.reading(cold.name)
    assert blocked.metrics.first_token_time is None  # still waiting for its read...
    assert all(r.finish_reason == "length" for r in behind)  # ...while those behind it went through
    assert len(first.output) >= 6  # and the running request never stopped
    release.set()
    sim.store.wait_reads(timeout=60)
    sim.run()
    assert blocked.finish_reason == "length" and first.finish_reason == "length"


@pytest.mark.parametrize("copying", [True, False])
def test_reused_tile_buffers_never_leak_into_the_host_tier(tmp_path, copying):
    """With a host tier that copies (pinned memory on GPU) each reader builds tiles in one reused buffer;
    a to_host that does not copy after all must not leave the host tier pointing into that buffer."""
    dirs = folders(tmp_path, 3, rank=16)
    econf = EngineConfig(num_pages=256)
    layout = PoolLayout(TINY.num_layers, 256, econf.page_rows, TINY.kv_size)
    calls = []

    def to_host(x):
        calls.append(x.shape)
        if x.shape == (1,):
            return x.copy()  # the probe: "this host tier copies"
        return x.copy() if copying else x  # the second: claims to copy, then hands the buffer back

    store = AdapterStore(TINY, econf, layout, UnifiedPagePool(layout),
                         AdapterTables(TINY, layout, econf.max_adapters_on_device, econf.max_lora_rank),
                         lambda p, t: None, np.float32, to_host=to_host, stage=lambda t: t)
    store._read_workers = 1
    for d in dirs:
        store.register(d.name, d)  # eager: one thread, one buffer for all three
    buffers = [store._scratch.buf]
    for d in dirs:
        assert not np.shares_memory(store._host[d.name].tiles, buffers[0])
        assert_same_paged(store._host[d.name], reference(d, TINY, layout, np.float32))


# ------------------------------------------------------------------------------------------ the arena


def _block_of(store, name):
    return store._blocks[id(store._host[name].tiles)][1]


def test_reads_land_in_the_arena_and_the_oldest_copies_make_room(tmp_path):
    a, b, c = folders(tmp_path, 3, rank=16)
    store, _ = make_store(arena_bytes=None)
    one = _align(store._plan_bytes(plan_record(store, a)))
    store, _ = make_store(arena_bytes=2 * one)  # room for two of them
    for d in (a, b):
        store.register(d.name, d)
    first = _block_of(store, a.name)
    store.register(c.name, c)  # a, the least recently used, makes room
    assert store.info(a.name).location == "disk" and store.counters["host_evictions"] == 1
    assert _block_of(store, c.name).offset == first.offset  # in a's old block, overwritten
    for d in (b, c):
        assert np.shares_memory(store._host[d.name].tiles, store._arena.buffer)
        assert_same_paged(store._host[d.name], reference(d, TINY, store.layout, np.float32))
    assert store.acquire(a.name)  # read again, into b's block (b is now the oldest)
    store.release(a.name)
    assert store.info(b.name).location == "disk"
    assert_same_paged(store._host[a.name], reference(a, TINY, store.layout, np.float32))
    assert_same_paged(store._host[c.name], reference(c, TINY, store.layout, np.float32))
    store.unregister(a.name)
    store.unregister(c.name)
    assert store._arena.used_bytes == 0
    store.close()


def plan_record(store, d):
    store.register("probe", d, lazy=True)
    rec = store._records["probe"]
    store.unregister("probe")
    return rec


class Pending(np.ndarray):
    """A device copy (numpy here) whose upload completes when ``block_until_ready`` is called."""

    events: list = []

    def is_ready(self):
        return False

    def block_until_ready(self):
        Pending.events.append("upload done")
        return self


def test_an_upload_in_flight_keeps_its_block_from_the_next_read(tmp_path, monkeypatch):
    a, b = folders(tmp_path, 2, rank=16)
    store, _ = make_store(arena_bytes=None)
    one = store._plan_bytes(plan_record(store, a))
    store, writes = make_store(arena_bytes=one, max_adapters_on_device=1)
    store._stage = lambda tiles: np.array(tiles).view(Pending)
    store.register(a.name, a)
    assert store.acquire(a.name)  # its upload "in flight" from the arena's only block
    store.release(a.name)
    Pending.events = []
    real = reader_mod.read_paged_adapter

    def read(*args, **kw):
        Pending.events.append("read")
        return real(*args, **kw)

    monkeypatch.setattr("slora_jax.adapters.store.read_paged_adapter", read)
    store.register(b.name, b)  # a's host copy makes room, but its block is reused only after the upload
    assert Pending.events == ["upload done", "read"]
    assert np.shares_memory(store._host[b.name].tiles, store._arena.buffer)
    assert_same_paged(store._host[b.name], reference(b, TINY, store.layout, np.float32))
    np.testing.assert_array_equal(writes[0][1], reference(a, TINY, store.layout, np.float32).tiles)
    store.close()


def test_staged_copies_never_alias_the_arena(tmp_path):
    """A backend that wraps host memory instead of copying it (here the identity; JAX on CPU may) must not
    leave a staged copy reading a block that a later read overwrites."""
    (a,) = folders(tmp_path, 1, rank=16)
    store, writes = make_store()
    store.register(a.name, a)
    assert store.acquire(a.name)
    assert not np.shares_memory(writes[0][1], store._arena.buffer)
    store.close()


def test_failed_and_dropped_reads_give_their_blocks_back(tmp_path, monkeypatch):
    good, bad, late = folders(tmp_path, 3, rank=16)
    weights = bad / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = np.full(16, np.nan, np.float32).tobytes()
    weights.write_bytes(bytes(data))
    store, _ = make_store()
    with pytest.raises(AdapterError, match="non-finite"):
        store.register(bad.name, bad)  # eager: on this thread
    assert store._arena.used_bytes == 0
    store.register(bad.name, bad, lazy=True)
    store.read_ahead([bad.name])
    store.wait_reads(timeout=60)
    store.begin_step(1)
    assert store.failed(bad.name) and store._arena.used_bytes == 0
    # Unloaded while its read is under way: the result is dropped and its block given back.
    store.register(late.name, late, lazy=True)
    started, release = _gate_reads(monkeypatch, [late.name])
    store.read_ahead([late.name])
    assert started.wait(30) and store._arena.used_bytes > 0
    store.unregister(late.name)
    release.set()
    deadline = time.time() + 30
    while store._arena.used_bytes and time.time() < deadline:
        time.sleep(0.01)
    assert store._arena.used_bytes == 0
    store.register(good.name, good)  # and the arena still serves
    assert np.shares_memory(store._host[good.name].tiles, store._arena.buffer)
    store.close()


def test_in_memory_adapters_live_in_the_arena_for_good(tmp_path):
    from slora_jax.adapters.synthetic import random_lora

    (d,) = folders(tmp_path, 1, rank=16)
    store, _ = make_store()
    lora = random_lora(TINY, 8, ("q_proj", "v_proj"), seed=3, name="m")
    store.register_weights("m1", lora)
    store.register_weights("m2", lora)  # one host copy for both names
    tiles = store._host["m1"].tiles
    assert store._host["m2"].tiles is tiles and np.shares_memory(tiles, store._arena.buffer)
    np.testing.assert_array_equal(tiles, page_adapter(lora, TINY, store.layout, 64, np.float32).tiles)
    used = store._arena.used_bytes
    store.register(d.name, d)
    store.unregister(d.name)
    assert store._arena.used_bytes == used  # the disk adapter came and went; the in-memory one stays
    store.unregister("m1")
    assert store._arena.used_bytes == used  # still used by m2
    store.unregister("m2")
    assert store._arena.used_bytes == 0
    store.close()


def test_completed_uploads_are_let_go_at_the_next_step(tmp_path):
    """The arena holds an upload's device array only while it may still read the block: each is an adapter's
    size of device memory (holding them all ran the H200 out of memory in a 1000-adapter pass)."""
    (a,) = folders(tmp_path, 1, rank=16)

    class Upload(np.ndarray):
        done = False

        def is_ready(self):
            return Upload.done

    store, _ = make_store()
    store._stage = lambda tiles: np.array(tiles).view(Upload)
    store.register(a.name, a)
    store.begin_step(1)
    assert store.acquire(a.name)
    block = _block_of(store, a.name)
    assert len(block.pending) == 1
    store.begin_step(2)
    assert len(block.pending) == 1  # not complete yet: kept
    Upload.done = True
    store.begin_step(3)
    assert block.pending == [] and store.info(a.name).location == "device"
    store.close()


@pytest.mark.parametrize("threads", [2, 3, 64])
def test_one_read_split_over_threads_reads_the_same_tiles(tmp_path, threads, monkeypatch):
    monkeypatch.setattr(reader_mod, "_BATCH_BYTES", 4096)  # many small batches: every thread takes some
    (d,) = folders(tmp_path, 1, rank=16)
    layout = PoolLayout(TINY.num_layers, 256, 16, TINY.kv_size)
    plan = plan_adapter(d, TINY, layout, 64)
    out = np.full(1 << 20, 0xAB, np.uint8)  # poisoned: only padding may be zeroed, the rest must be written
    got, nbytes = read_paged_adapter(plan, TINY, layout, 64, np.float32, out, threads=threads)
    assert nbytes == tensor_bytes(d) and np.shares_memory(got.tiles, out)
    assert_same_paged(got, reference(d, TINY, layout, np.float32))


@pytest.mark.parametrize("fault", [AdapterError, KeyboardInterrupt])
def test_a_failure_in_one_part_fails_the_read_once_every_part_is_done(tmp_path, monkeypatch, fault):
    monkeypatch.setattr(reader_mod, "_BATCH_BYTES", 4096)
    (d,) = folders(tmp_path, 1, rank=16)
    layout = PoolLayout(TINY.num_layers, 256, 16, TINY.kv_size)
    plan = plan_adapter(d, TINY, layout, 64)
    real, calls = reader_mod.pread_into, []

    def flaky(fd, view, offset, path, err):
        calls.append(threading.get_ident())
        if len(calls) == 3:
            raise fault(f"{path} ended at byte {offset}")
        time.sleep(0.001)
        return real(fd, view, offset, path, err)

    monkeypatch.setattr(reader_mod, "pread_into", flaky)
    with pytest.raises(fault, match="ended at byte"):  # Ctrl-C too: raised once no part reads the file
        read_paged_adapter(plan, TINY, layout, 64, np.float32, threads=3)
    n = len(calls)
    time.sleep(0.2)
    assert len(calls) == n  # no part of the read still reads the (closed) file
    assert len(set(calls)) > 1


def test_weights_registered_twice_at_once_share_one_copy(tmp_path, monkeypatch):
    """Two registrations of the same LoraWeights racing: the second to finish shares the first's host copy and
    gives its own block back (none is left pointing into a block the arena may hand out again)."""
    from slora_jax.adapters import store as store_mod
    from slora_jax.adapters.synthetic import random_lora

    store, _ = make_store()
    lora = random_lora(TINY, 8, ("q_proj", "v_proj"), seed=3, name="m")
    real = store_mod.page_adapter
    raced = []

    def page_then_race(*a, **k):
        out = real(*a, **k)
        if not raced:  # while "m2" pages the weights, "m1" registers the same object
            raced.append(1)
            store.register_weights("m1", lora)
        return out

    monkeypatch.setattr(store_mod, "page_adapter", page_then_race)
    store.register_weights("m2", lora)
    tiles = store._host["m1"].tiles
    assert store._host["m2"].tiles is tiles and id(tiles) in store._blocks
    assert store._arena.used_bytes == _align(tiles.nbytes)  # one copy in the arena, the other given back
    store.unregister("m1")
    store.unregister("m2")
    assert store._arena.used_bytes == 0
    store.close()


def test_close_gives_the_arena_memory_back_and_takes_no_more_blocks(tmp_path):
    from slora_jax.adapters.synthetic import random_lora

    (d,) = folders(tmp_path, 1, rank=16)
    store, _ = make_store()
    store.register(d.name, d)
    store.register_weights("m", random_lora(TINY, 8, ("q_proj",), seed=1, name="m"))
    arena = store._arena
    store.close()
    assert arena._mm.closed  # no view of it was left behind
    assert arena.alloc(1) is None


def test_staged_arrays_with_several_shards_are_checked_shard_by_shard():
    from slora_jax.adapters.store import _aliases

    buf = np.zeros(1 << 16, np.uint8)

    class Part:
        def __init__(self, ptr):
            self.ptr = ptr

        def unsafe_buffer_pointer(self):
            return self.ptr

    class Shard:
        def __init__(self, ptr):
            self.data = Part(ptr)

    class Sharded:  # as a replicated jax.Array: no single buffer pointer, one per device
        def __init__(self, *ptrs):
            self.addressable_shards = [Shard(p) for p in ptrs]

        def unsafe_buffer_pointer(self):
            raise ValueError("several shards")

    inside, outside = buf.ctypes.data + 128, buf.ctypes.data + buf.nbytes + 4096
    assert _aliases(Sharded(outside, inside), buf)
    assert not _aliases(Sharded(outside, outside + 64), buf)
