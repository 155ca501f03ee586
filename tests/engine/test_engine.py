"""The paged engine on a tiny random checkpoint: invariance, pressure, preemption, errors, compiled shapes."""

import numpy as np
import pytest

import slora_jax as sj
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter, write_random_checkpoint
from tests.engine.steps import compiled_steps, dispatched_steps

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cfg = tiny_llama_config()
    model = write_random_checkpoint(root / "model", cfg, seed=1, std=0.08)
    specs = [(8, ("q_proj", "v_proj")), (16, ALL), (1, ("k_proj",)), (32, ("gate_proj", "up_proj", "down_proj")),
             (4, ("o_proj",)), (8, ALL)]
    adapters = {f"a{i}": write_random_adapter(root / f"a{i}", cfg, rank=r, alpha=2 * r, target_modules=t,
                                              seed=10 + i, init_scale=0.3) for i, (r, t) in enumerate(specs)}
    return model, adapters


def make_engine(tiny, **kw):
    model, adapters = tiny
    kw.setdefault("num_pages", 512)
    eng = sj.Engine.from_pretrained(model, config=sj.EngineConfig(dtype="float32", **kw))
    for name, d in adapters.items():
        eng.load_adapter(name, d)
    return eng


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=int(rng.integers(3, 20))).tolist() for _ in range(n)]


GREEDY = sj.SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny):
    return make_engine(tiny)


@pytest.mark.slow
def test_batch_invariance_alone_vs_crowd(engine):
    ps = prompts(7, seed=1)
    names = [None, "a0", "a1", "a2", "a3", "a4", "a5"]
    crowd = engine.generate(ps, adapters=names, sampling=GREEDY)
    for p, a, out in zip(ps, names, crowd):
        alone = engine.generate([p], adapters=[a], sampling=GREEDY)[0]
        assert alone.token_ids == out.token_ids, a
        assert out.finish_reason == "length" and len(out.token_ids) == 8
    # Adapters really change the output (otherwise invariance would be vacuous).
    base = crowd[0].token_ids
    same_prompt = engine.generate([ps[0]] * 3, adapters=[None, "a1", "a5"], sampling=GREEDY)
    assert same_prompt[0].token_ids == base
    assert same_prompt[1].token_ids != base or same_prompt[2].token_ids != base
    st = engine.stats()
    assert st["kv_pages"] == 0 and st["running"] == 0 and st["waiting"] == 0


def test_logits_match_generate(engine):
    p = prompts(1, seed=3)[0]
    out = engine.generate([p], adapters=["a1"], sampling=GREEDY)[0]
    lg = engine.logits([p + out.token_ids[:-1]], adapters=["a1"])[0]
    assert lg.shape == (len(p) + 7, 256)
    assert np.argmax(lg[len(p) - 1:], axis=-1).tolist() == out.token_ids


@pytest.mark.slow
def test_sampling_seeded_reproducible_and_batch_independent(engine):
    sp = sj.SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    p = prompts(1, seed=5)[0]
    a = engine.generate([p], adapters=["a0"], sampling=sp)[0]
    b = engine.generate([p] + prompts(3, seed=6), adapters=["a0", None, "a2", "a3"],
                        sampling=[sp, GREEDY, GREEDY, GREEDY])[0]
    assert a.token_ids == b.token_ids
    c = engine.generate([p], adapters=["a0"], sampling=sj.SamplingParams(
        max_tokens=10, temperature=1.0, seed=124, ignore_eos=True))[0]
    assert c.token_ids != a.token_ids
    # top_k=1 is greedy whatever the temperature
    g = engine.generate([p], sampling=sj.SamplingParams(max_tokens=6, temperature=2.0, top_k=1, seed=1,
                                                        ignore_eos=True))[0]
    assert g.token_ids == engine.generate([p], sampling=sj.SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids


def test_stop_tokens_and_stream(engine):
    p = prompts(1, seed=7)[0]
    full = engine.generate([p], sampling=sj.SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    stop = full[3]
    out = engine.generate([p], sampling=sj.SamplingParams(max_tokens=8, stop_token_ids=(stop,), ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == full[:full.index(stop) + 1]
    seen = list(engine.stream(p, adapter=None, sampling=sj.SamplingParams(max_tokens=8, ignore_eos=True)))
    assert [len(s.token_ids) for s in seen] == list(range(1, 9))
    assert seen[-1].token_ids == full and seen[-1].finish_reason == "length"
    assert all(s.finish_reason is None for s in seen[:-1])


def test_abort_frees_pages(engine):
    rid = engine.add_request(prompts(1)[0], adapter="a1", sampling=sj.SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats()["kv_pages"] > 0
    engine.abort(rid)
    outs = engine.step()
    assert [o.finish_reason for o in outs if o.request_id == rid] == ["abort"]
    assert engine.stats()["kv_pages"] == 0 and not engine.has_unfinished()


@pytest.mark.parametrize("bad,msg", [
    (dict(prompt=[1, 2, 999]), "outside the vocabulary"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1, -1]), "outside the vocabulary"),
    (dict(prompt=[1.5]), "integers"),
    (dict(prompt=[3] * 256), "context"),
    (dict(sampling=sj.SamplingParams(temperature=-1)), "temperature"),
    (dict(sampling=sj.SamplingParams(top_p=0)), "top_p"),
    (dict(sampling=sj.SamplingParams(top_k=-2)), "top_k"),
    (dict(sampling=sj.SamplingParams(max_tokens=0)), "max_tokens"),
    (dict(prompt="text"), "tokenizer"),
])
def test_bad_requests_are_refused_and_engine_keeps_serving(engine, bad, msg):
    kw = dict(prompt=[1, 2, 3], adapter=None, sampling=GREEDY)
    kw.update(bad)
    with pytest.raises(sj.RequestError, match=msg):
        engine.add_request(kw["prompt"], kw["adapter"], kw["sampling"])
    assert engine.generate([[5, 6, 7]], sampling=GREEDY)[0].finish_reason == "length"
    assert engine.stats()["kv_pages"] == 0


def test_unknown_adapter(engine):
    with pytest.raises(sj.UnknownAdapterError, match="nope"):
        engine.generate([[1, 2]], adapters=["nope"], sampling=GREEDY)
    with pytest.raises(LookupError):
        engine.add_request([1, 2], adapter="nope")
    assert engine.stats()["waiting"] == 0


@pytest.mark.slow
def test_eviction_under_pressure_more_adapters_than_fit(tiny):
    ref = make_engine(tiny)
    ps = prompts(12, seed=11)
    names = [f"a{i % 6}" for i in range(12)]
    expected = [o.token_ids for o in ref.generate(ps, adapters=names, sampling=GREEDY)]
    small = make_engine(tiny, num_pages=96, max_adapters_on_device=2)
    got = small.generate(ps, adapters=names, sampling=GREEDY)
    assert [o.token_ids for o in got] == expected
    st = small.stats()
    assert st["adapter_evictions"] > 0 and st["adapters_on_device"] <= 2
    assert st["kv_pages"] == 0
    small.pool.check_invariants()


@pytest.mark.slow
def test_preemption_small_pool_finishes_everything_correctly(tiny):
    ref = make_engine(tiny)
    ps = prompts(8, seed=12)
    names = [None, "a0", "a1", None, "a2", "a3", "a4", "a5"]
    sp = sj.SamplingParams(max_tokens=24, ignore_eos=True)
    expected = [o.token_ids for o in ref.generate(ps, adapters=names, sampling=sp)]
    small = make_engine(tiny, num_pages=200, page_rows=4)
    got = small.generate(ps, adapters=names, sampling=sp)
    assert [o.token_ids for o in got] == expected
    assert small.stats()["preemptions"] > 0
    assert small.stats()["kv_pages"] == 0
    small.pool.check_invariants()


@pytest.mark.slow
def test_compiled_shapes_bounded_over_long_run(engine):
    rng = np.random.default_rng(3)
    for _ in range(6):
        n = int(rng.integers(1, 10))
        engine.generate(prompts(n, seed=int(rng.integers(1000))),
                        adapters=[[None, "a0", "a1", "a2"][i % 4] for i in range(n)],
                        sampling=sj.SamplingParams(max_tokens=int(rng.integers(1, 12)), ignore_eos=True))
    # prefill: T buckets {16, 32, 64, 128} (rows follow T); decode: batch buckets x table widths
    assert engine.stats()["compiled_shapes"] <= 30


@pytest.mark.slow
def test_precompile_covers_every_step_and_changes_no_output(tiny):
    """After ``precompile`` a mixed workload (adapters, sampling, preemption) compiles nothing, and its tokens
    equal an engine that compiled on demand."""
    # 47 usable pages, of which adapter a3 alone takes 36: the batch runs out of KV pages and preempts.
    kw = dict(max_batch_size=4, max_prefill_tokens=48, max_model_len=64, num_pages=48)
    ahead, lazy = make_engine(tiny, **kw), make_engine(tiny, **kw)
    records = ahead.precompile(sampling=True, max_workers=2)
    shapes = ahead.step_shapes()
    variants = ahead.lora_variants()
    assert variants == [(), ("qkv", "o", "gate_up", "down")]  # no LoRA, and what the adapters target together
    assert len(ahead.step_programs()) == len(shapes) * len(variants)  # XLA kernels here: no tiles variant
    assert len(records) == 2 * len(ahead.step_programs()) == ahead.stats()["compiled_shapes"]
    assert {(r["mode"], r["size"], r["width"]) for r in records} == set(shapes)
    assert all(r["compile_s"] > 0 for r in records)
    assert ahead.precompile() == []  # nothing left to compile
    ps = prompts(9, seed=7)
    names = [None, "a0", "a1", "a2", "a3", "a4", "a5", "a0", None]
    samplings = [sj.SamplingParams(max_tokens=12 + i, ignore_eos=True, temperature=0.8 * (i % 2), seed=i)
                 for i in range(9)]
    got = ahead.generate(ps, adapters=names, sampling=samplings)
    want = lazy.generate(ps, adapters=names, sampling=samplings)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert ahead.stats()["compiled_shapes"] == len(records)
    assert ahead.stats()["preemptions"] > 0  # the small pool exercised preemption on precompiled programs
    assert ahead.stats()["kv_pages"] == 0


def test_pool_updated_in_place(engine):
    """Same buffer after steps, and no compiled step program contains a copy of a pool-shaped buffer."""
    before = engine.runner.pool_pointer()

    def run():
        engine.generate([prompts(1, seed=21)[0]], adapters=["a0"], sampling=GREEDY)  # batch of one
        engine.generate(prompts(3, seed=22), adapters=["a0", "a3", None], sampling=GREEDY)

    steps = compiled_steps(engine, run)
    assert engine.runner.pool_pointer() == before
    pool_shape = ",".join(map(str, engine.runner.pool.shape))
    modes = set()
    for mode, hlo in steps:
        copies = [ln for ln in hlo.splitlines() if f"[{pool_shape}]" in ln and " copy(" in ln]
        assert not copies, (mode, copies[:2])
        modes.add(mode)
    assert modes == {"mixed", "decode"}


@pytest.mark.slow
def test_request_that_can_never_fit_is_refused(tiny):
    eng = make_engine(tiny, num_pages=64, page_rows=4)  # adapter a1 (rank 16, all modules) needs 128 pages
    with pytest.raises(sj.RequestError, match="a1"):
        eng.add_request([1, 2, 3], adapter="a1")
    # KV alone: 3 + 200 tokens need 2 * 51 pages > 63
    with pytest.raises(sj.RequestError, match="max_tokens"):
        eng.add_request([1, 2, 3], sampling=sj.SamplingParams(max_tokens=200))
    assert eng.generate([[1, 2, 3]], adapters=["a0"], sampling=GREEDY)[0].finish_reason == "length"


def test_unload_adapter(tiny):
    eng = make_engine(tiny)
    eng.generate([[1, 2, 3]], adapters=["a0"], sampling=GREEDY)
    info = {a.name: a for a in eng.list_adapters()}
    assert info["a0"].location == "device" and info["a0"].rank == 8
    eng.unload_adapter("a0")
    assert "a0" not in {a.name for a in eng.list_adapters()}
    with pytest.raises(sj.UnknownAdapterError):
        eng.generate([[1, 2, 3]], adapters=["a0"], sampling=GREEDY)
    assert eng.stats()["adapter_pages"] == sum(a.device_pages for a in eng.list_adapters())


@pytest.mark.slow
def test_randomised_stress_adds_aborts_preemption_eviction(tiny):
    """Random arrivals and aborts against a pool too small for the load: every request that is not
    aborted ends with exactly its reference tokens, aborted ones with a prefix of them, and the pool's
    books balance with zero KV pages at the end."""
    combos = [(p, a) for p, a in zip(prompts(8, seed=31), [None, "a0", "a1", "a2", "a3", "a4", "a5", "a1"])]
    sp = sj.SamplingParams(max_tokens=12, ignore_eos=True)
    ref_engine = make_engine(tiny)
    reference = [o.token_ids for o in ref_engine.generate([p for p, _ in combos], adapters=[a for _, a in combos],
                                                          sampling=sp)]
    # 200 pages of 4 rows: a3 (rank 32 on the MLP) alone takes 144, so requests keep evicting and
    # preempting one another; each still fits alone, as submission checks.
    eng = make_engine(tiny, num_pages=200, page_rows=4, max_adapters_on_device=3, max_batch_size=6)
    rng = np.random.default_rng(7)
    combo_of, outs, aborted = {}, {}, set()
    for _ in range(400):
        r = rng.random()
        if r < 0.25 and len(combo_of) < 60:
            c = int(rng.integers(len(combos)))
            rid = eng.add_request(combos[c][0], adapter=combos[c][1], sampling=sp)
            combo_of[rid] = c
        elif r < 0.32 and combo_of:
            rid = list(combo_of)[int(rng.integers(len(combo_of)))]
            eng.abort(rid)
            aborted.add(rid)
        for out in eng.step():
            outs[out.request_id] = out
        eng.pool.check_invariants()
    while eng.has_unfinished():
        for out in eng.step():
            outs[out.request_id] = out
    assert set(outs) == set(combo_of)
    for rid, out in outs.items():
        ref = reference[combo_of[rid]]
        assert out.finished
        if out.finish_reason == "abort":
            assert rid in aborted and out.token_ids == ref[:len(out.token_ids)]
        else:
            assert out.token_ids == ref, rid
    st = eng.stats()
    assert st["kv_pages"] == 0 and st["running"] == 0 and st["waiting"] == 0
    assert st["preemptions"] > 0 or st["adapter_evictions"] > 0
    eng.pool.check_invariants()


@pytest.mark.slow
def test_text_prompts_with_a_tokenizer(tmp_path):
    """With a tokenizer.json, string prompts encode like the tokenizer does and outputs carry text."""
    import tokenizers

    from tests.server.support import write_byte_tokenizer

    model = write_random_checkpoint(tmp_path / "m", tiny_llama_config(), seed=4, std=0.08)
    write_byte_tokenizer(model)
    eng = sj.Engine.from_pretrained(model, config=sj.EngineConfig(dtype="float32", num_pages=128))
    reference = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = reference.encode("hello adapters").ids
    by_text, by_ids = eng.generate(["hello adapters", ids], sampling=GREEDY)
    assert by_text.prompt_token_ids == ids
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.text == reference.decode(by_text.token_ids)


def test_step_out_of_device_memory_says_which_settings_to_lower(tiny, monkeypatch):
    """A step program that cannot get its working memory (the pool took too much) fails with the settings to
    change, not with XLA's bare allocator message."""
    import jax

    eng = make_engine(tiny)

    def out_of_memory(*args, **kwargs):
        def run(*a):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.50GiB")
        return run

    monkeypatch.setattr(eng.runner, "_fn", out_of_memory)
    eng.add_request([1, 2, 3], sampling=GREEDY)
    with pytest.raises(sj.ConfigError, match=r"mixed step ran out of device memory .*8\.50GiB.*512 pages.*"
                                             r"memory_fraction \(now 0\.85\).*max_prefill_tokens"):
        eng.step()


@pytest.mark.slow  # compiles two engines of a model of its own, ~8 s cold on two cores
def test_shapes_a_pallas_kernel_cannot_take_are_caught_when_the_engine_is_built(tmp_path, monkeypatch, caplog):
    """head_dim 8: 'pallas' is refused at construction naming the ops and their limit; 'auto' where Pallas would
    be chosen runs those ops on XLA (said once in the log) and gives the XLA engine's tokens."""
    import slora_jax.engine.engine as engine_mod
    from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_checkpoint

    model = write_random_checkpoint(tmp_path / "hd8", tiny_llama_config(hidden_size=32, head_dim=8), seed=4, std=0.1)
    with pytest.raises(sj.ConfigError, match=r"paged_decode_attention: head_dim must be a power of two >= 16, got 8"):
        sj.Engine.from_pretrained(model, config=sj.EngineConfig(dtype="float32", kernel_backend="pallas", num_pages=64))
    ps = prompts(3, seed=9)
    sp = sj.SamplingParams(max_tokens=4, ignore_eos=True)
    want = sj.Engine.from_pretrained(model, config=sj.EngineConfig(dtype="float32", kernel_backend="xla",
                                                                   num_pages=64)).generate(ps, sampling=sp)
    monkeypatch.setattr(engine_mod, "_on_gpu", lambda: True)  # where "auto" picks Pallas
    with caplog.at_level("WARNING", logger="slora_jax.engine"):
        eng = sj.Engine.from_pretrained(model, config=sj.EngineConfig(dtype="float32", num_pages=64))
    assert eng.kernel_backend == "pallas"
    assert any("XLA path" in r.message and "paged_prefill_attention" in r.message for r in caplog.records)
    assert [o.token_ids for o in eng.generate(ps, sampling=sp)] == [o.token_ids for o in want]


def test_close_gives_the_device_memory_back(tiny):
    """After close() the engine's weights, pool and tables are gone from the device (another engine can take
    the memory), running requests end as aborted, and the engine refuses further work."""
    import gc

    import jax

    model, adapters = tiny
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    # make_engine's configuration: its step programs are compiled already (the pool's size is not what is checked).
    eng = sj.Engine.from_pretrained(model, config=sj.EngineConfig(dtype="float32", num_pages=512))
    eng.load_adapter("a1", adapters["a1"], lazy=True)
    seen = []
    eng.add_request([1, 2, 3], adapter="a1", sampling=sj.SamplingParams(max_tokens=50, ignore_eos=True),
                    listener=seen.append)
    eng.step()
    eng.step()
    assert seen and not seen[-1].finished
    held = [a for a in jax.live_arrays() if id(a) not in before]
    assert sum(a.nbytes for a in held) > 0
    eng.close()
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    eng.close()  # idempotent
    del held
    gc.collect()
    left = [a for a in jax.live_arrays() if id(a) not in before]
    assert sum(a.nbytes for a in left) < 1024, [(a.shape, a.dtype) for a in left]
    with pytest.raises(sj.RequestError, match="closed"):
        eng.step()


def test_decode_steps_on_few_adapters_run_the_tile_kernels_and_match_xla(tiny):
    """20 requests on two adapters: with LoRA on the Pallas kernels (interpret mode here) their decode steps of
    more than 16 adapted rows pick MBGMV's tile kernels (the step's LoRA variant gains LORA_TILES; its plan is
    computed once per step), only those steps do, each is a program ``precompile`` covers, and the tokens equal
    an XLA engine's. With ``lora_decode_tiles=False`` the engine has no tiles programs, so no step can pick them
    (`step_variant` and `lora_variants` read the same switch)."""
    from slora_jax.model.llama import LORA_TILES

    model, adapters = tiny
    kw = dict(dtype="float32", max_batch_size=32, max_prefill_tokens=256, num_pages=512)
    ps = prompts(20, seed=21)
    names = ["a1"] * 12 + ["a5"] * 8
    sp = sj.SamplingParams(max_tokens=3, ignore_eos=True)

    def run(**conf):
        eng = sj.Engine.from_pretrained(model, config=sj.EngineConfig(**kw, **conf))
        for n in ("a1", "a5"):
            eng.load_adapter(n, adapters[n])
        outs = []
        steps = dispatched_steps(eng, lambda: outs.extend(eng.generate(ps, adapters=names, sampling=sp)))
        return [o.token_ids for o in outs], steps, eng

    want, _, _ = run(kernel_backend="xla")
    got, steps, eng = run(kernel_backend="pallas")
    assert got == want
    tiled = [(mode, inp) for mode, _, inp, _, groups in steps if LORA_TILES in groups]
    assert tiled and {mode for mode, _ in tiled} == {"decode"}, [(m, g) for m, _, _, _, g in steps]
    assert all(int(np.sum(np.asarray(inp["token_slot"]) >= 0)) > 16 for _, inp in tiled)
    programs = {(groups, mode, n) for groups, mode, n, _ in eng.step_programs()}
    assert all((groups, mode, inp["tokens"].shape[0]) in programs for mode, _, inp, _, groups in steps)
    assert (*eng.lora_variants()[1], LORA_TILES) in eng.lora_variants()
    eng_off = sj.Engine.from_pretrained(model, config=sj.EngineConfig(**kw, kernel_backend="pallas",
                                                                      lora_decode_tiles=False))
    eng_off.load_adapter("a1", adapters["a1"])
    assert not any(LORA_TILES in groups for groups in eng_off.lora_variants())
    assert not any(LORA_TILES in groups for groups, *_ in eng_off.step_programs())


def test_steps_whose_adapters_fit_one_rank_block_run_the_one_block_programs_and_match_xla(tiny):
    """Requests on rank-16 and rank-8 adapters (one 16-row rank block each, in a pool of max rank 64) and on a
    rank-32 one: with LoRA on the Pallas kernels (interpret mode), exactly the steps none of whose adapters has a
    rank above 16 run the one-rank-block programs (LORA_ONE_BLOCK: tables cut to one block), each a program
    ``step_programs`` lists, and the tokens equal an XLA engine's. ``lora_one_block_programs=False``, the XLA
    backend, and a pool of one rank block compile none."""
    from slora_jax.model.llama import LORA_ONE_BLOCK

    model, adapters = tiny
    kw = dict(dtype="float32", max_batch_size=16, max_prefill_tokens=64, num_pages=512)
    sp = sj.SamplingParams(max_tokens=3, ignore_eos=True)
    rank = {"a1": 16, "a5": 8, "a3": 32}

    def run(batches, **conf):
        eng = sj.Engine.from_pretrained(model, config=sj.EngineConfig(**kw, **conf))
        for n in rank:
            eng.load_adapter(n, adapters[n])
        outs, steps = [], []
        for i, names in enumerate(batches):
            ps = prompts(len(names), seed=30 + i)
            steps.append(dispatched_steps(eng, lambda: outs.extend(eng.generate(ps, adapters=names, sampling=sp))))
        return [o.token_ids for o in outs], steps, eng

    # One batch on the small ranks only, then one with the rank-32 adapter first (the first step holds its prompt).
    batches = [["a1", "a5", None, "a1"], ["a3", "a5", "a1", None]]
    want, _, _ = run(batches, kernel_backend="xla")
    got, (small, mixed), eng = run(batches, kernel_backend="pallas")
    assert got == want
    assert small and all(LORA_ONE_BLOCK in groups for *_, groups in small), [g for *_, g in small]
    assert LORA_ONE_BLOCK not in mixed[0][4] and mixed[0][4], mixed[0][4]
    steps = small + mixed
    programs = {(groups, mode, n) for groups, mode, n, _ in eng.step_programs()}
    assert all((groups, mode, inp["tokens"].shape[0]) in programs for mode, _, inp, _, groups in steps)
    assert sum(LORA_ONE_BLOCK in g for g in eng.lora_variants()) == sum(
        bool(g) and LORA_ONE_BLOCK not in g for g in eng.lora_variants())
    for conf in (dict(kernel_backend="pallas", lora_one_block_programs=False), dict(kernel_backend="xla"),
                 dict(kernel_backend="pallas", max_lora_rank=16)):
        off = sj.Engine.from_pretrained(model, config=sj.EngineConfig(**kw, **conf))
        off.load_adapter("a1", adapters["a1"])
        assert not any(LORA_ONE_BLOCK in g for g in off.lora_variants()), conf
