"""LoRA training: the dense forward against transformers + peft, a toy pattern really learned, the PEFT
folder it saves read by peft and by the engine with equal logits, and a hot load into an engine that keeps
serving other adapters' streams from a background thread."""

import dataclasses
import functools
import json
import threading
import time

import jax
import numpy as np
import pytest

import slora_jax as sj
from slora_jax.adapters import load_peft_adapter
from slora_jax.adapters import store as adapter_store
from slora_jax.errors import AdapterError, ConfigError, ModelError, RequestError
from slora_jax.model.checkpoint import load_params
from slora_jax.model.hf_config import load_model_config
from slora_jax.training import (base_params, causal_lm_logits, init_lora, lora_params, save_peft_adapter,
                                train_lora)
from tests.hf_reference import hf_greedy, hf_logits

CYCLE = [20, 27, 33, 41, 50, 61, 75]  # the toy pattern: this cycle, from any phase
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
F32 = sj.EngineConfig(dtype="float32", num_pages=256, max_lora_rank=64)


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cycle_from(phase, n):
    return [CYCLE[(phase + j) % len(CYCLE)] for j in range(n)]


def pattern_sequences(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return [cycle_from(int(rng.integers(len(CYCLE))), int(rng.integers(12, 25))) for _ in range(n)]


@pytest.fixture(scope="module")
def cfg(llama_gqa_dir):
    return load_model_config(llama_gqa_dir)


@pytest.fixture(scope="module")
def trained(llama_gqa_dir):
    return train_lora(str(llama_gqa_dir), None, pattern_sequences(), rank=8, alpha=16, target_modules=ALL,
                      steps=40, learning_rate=1e-2, batch_size=8, seed=0, progress=False, name="cycle")


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    return save_peft_adapter(trained, tmp_path_factory.mktemp("trained") / "cycle", base_model_name="llama-gqa")


@pytest.fixture(scope="module")
def engine(llama_gqa_dir):
    return sj.Engine.from_pretrained(llama_gqa_dir, config=F32)


@pytest.fixture(scope="module")
def unrolled_engine(llama_gqa_dir):
    """Layers unrolled, as GPU engines hold them by default: a list of per-layer weight dicts."""
    return sj.Engine.from_pretrained(llama_gqa_dir, config=dataclasses.replace(F32, scan_layers=False))


def unstack(layers):
    return [jax.tree.map(lambda a: a[l], layers) for l in range(len(next(iter(layers.values()))))]


# ------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
@pytest.mark.parametrize("adapter", [None, "rslora_all_r16", "patterns"])
def test_dense_forward_matches_transformers_peft(llama_gqa_dir, llama_adapters, cfg, adapter, layout):
    base, _ = base_params(str(llama_gqa_dir), cfg)
    if layout == "unrolled":
        base = {**base, "layers": unstack(base["layers"])}
    if adapter is None:
        lora, scales = {}, {}
    else:
        lora, scales = lora_params(load_peft_adapter(llama_adapters[adapter], cfg, 64, adapter))
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (13, 6)]  # padded batch of two
    tokens = np.zeros((2, 16), np.int32)
    valid = np.zeros((2, 16), bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)], valid[i, :len(s)] = s, True
    fwd = jax.jit(functools.partial(causal_lm_logits, cfg=cfg))
    got = np.asarray(fwd(base, lora, scales, tokens, valid))
    for i, s in enumerate(seqs):
        ref = hf_logits(llama_gqa_dir, None if adapter is None else llama_adapters[adapter], s)
        assert rel_err(got[i, :len(s)], ref) < 1e-4


def test_init_lora_is_peft_init_and_leaves_the_model_unchanged(cfg):
    lora = init_lora(cfg, rank=4, alpha=8, target_modules=["v_proj", "q_proj"], use_rslora=True, seed=1)
    assert lora.target_modules == ("q_proj", "v_proj") and lora.rank == 4
    q = lora.modules["q_proj"]
    bound = 1 / np.sqrt(cfg.hidden_size)
    assert q.a.shape == (cfg.num_layers, 4, cfg.hidden_size) and np.abs(q.a).max() <= bound
    assert np.abs(q.a).max() > 0.5 * bound and not q.b.any()
    np.testing.assert_allclose(q.scales, 8 / 2.0)  # rsLoRA: alpha / sqrt(r)
    assert init_lora(cfg, target_modules="all-linear").target_modules == ALL


def test_base_weights_from_engine_folder_or_pytree_agree(engine, llama_gqa_dir, cfg):
    from_engine, _ = base_params(engine)
    from_disk, _ = base_params(str(llama_gqa_dir), cfg)
    from_pytree, _ = base_params(load_params(llama_gqa_dir, cfg, "float32"), cfg)
    for tree in (from_disk, from_pytree):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), tree, from_engine)
    # The engine's on-device weights are used in place, not copied.
    a, b = from_engine["layers"]["wqkv"], engine.runner.params["layers"]["wqkv"]
    assert a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
    q = cfg.q_size
    raw = load_params(llama_gqa_dir, cfg, "float32")["layers"]["wq"]
    np.testing.assert_array_equal(np.asarray(from_engine["layers"]["wqkv"][..., :q]), raw)
    half, _ = base_params(engine, dtype="bfloat16")
    assert all(a.dtype == jax.numpy.bfloat16 for a in jax.tree.leaves(half))


def test_base_weights_of_an_unrolled_engine_are_its_own_and_equal_the_checkpoint(unrolled_engine, llama_gqa_dir,
                                                                                  cfg):
    got, got_cfg = base_params(unrolled_engine)
    assert got_cfg == cfg and isinstance(got["layers"], list) and len(got["layers"]) == cfg.num_layers
    stacked, _ = base_params(str(llama_gqa_dir), cfg)
    for l, lay in enumerate(got["layers"]):
        for k, v in lay.items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(stacked["layers"][k][l]))
            # Used in place, not copied.
            assert v.unsafe_buffer_pointer() == unrolled_engine.runner.params["layers"][l][k].unsafe_buffer_pointer()
    # An unfused pytree with unrolled layers is fused layer by layer.
    raw = load_params(llama_gqa_dir, cfg, "float32")
    fused, _ = base_params({**raw, "layers": unstack(raw["layers"])}, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fused, got)
    with pytest.raises(ModelError, match="do not match"):
        base_params({**raw, "layers": unstack(raw["layers"])[:1]}, cfg)


# ------------------------------------------------------------------------------------------ training


@pytest.mark.slow  # two trainings and the unrolled model's step programs, ~13 s cold on two cores
def test_training_on_an_unrolled_engine_equals_training_on_the_checkpoint(unrolled_engine, llama_gqa_dir, tmp_path):
    kw = dict(rank=4, alpha=8, target_modules=ALL, steps=6, learning_rate=1e-2, batch_size=4, seed=1,
              progress=False)
    seqs = pattern_sequences(16, seed=2)
    got = train_lora(unrolled_engine, None, seqs, name="unrolled", **kw)
    ref = train_lora(str(llama_gqa_dir), None, seqs, name="stacked", **kw)
    np.testing.assert_allclose(got.loss_history, ref.loss_history, rtol=1e-5)
    assert got.loss_history[-1] < got.loss_history[0]  # it trained
    for m, ml in ref.modules.items():
        assert np.abs(ml.b).max() > 0  # B moved off its zero init: the comparison below is not vacuous
        np.testing.assert_allclose(got.modules[m].a, ml.a, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.modules[m].b, ml.b, rtol=1e-4, atol=1e-6)
    # The unrolled engine serves what it trained.
    unrolled_engine.load_adapter_weights("unrolled", got)
    prompt = cycle_from(3, 7)
    logits = unrolled_engine.logits([prompt], adapters=["unrolled"])[0]
    saved = save_peft_adapter(got, tmp_path / "unrolled", base_model_name="llama-gqa")
    assert rel_err(logits, hf_logits(llama_gqa_dir, saved, prompt)) < 1e-4


def test_training_learns_the_pattern(trained, engine):
    losses = trained.loss_history
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert losses[0] > 3.0  # the random base model knows nothing of the pattern
    assert np.mean(losses[-5:]) < 0.1 * losses[0]
    if "cycle-mem" not in engine.adapters:
        engine.load_adapter_weights("cycle-mem", trained)
    prompts = [cycle_from(p, 5) for p in range(len(CYCLE))]
    expected = [cycle_from(p + 5, 10) for p in range(len(CYCLE))]
    sp = sj.SamplingParams(max_tokens=10, ignore_eos=True)
    outs = engine.generate(prompts * 2, adapters=[None] * len(prompts) + ["cycle-mem"] * len(prompts), sampling=sp)

    def follows(out, exp):
        return np.mean([a == b for a, b in zip(out.token_ids, exp)])

    base = np.mean([follows(o, e) for o, e in zip(outs[:len(prompts)], expected)])
    tuned = np.mean([follows(o, e) for o, e in zip(outs[len(prompts):], expected)])
    assert tuned >= 0.95 and base <= 0.2, (base, tuned)


def test_saved_adapter_gives_engine_and_peft_the_same_logits(trained, saved, engine, llama_gqa_dir, cfg):
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == sorted(ALL) and config["base_model_name_or_path"] == "llama-gqa"
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and not config["use_rslora"]
    back = load_peft_adapter(saved, cfg, 64, "back")
    for m, ml in trained.modules.items():
        np.testing.assert_array_equal(back.modules[m].a, ml.a)
        np.testing.assert_array_equal(back.modules[m].b, ml.b)
        np.testing.assert_allclose(back.modules[m].scales, ml.scales, rtol=1e-7)

    if "cycle-disk" not in engine.adapters:
        engine.load_adapter("cycle-disk", saved)
    if "cycle-mem" not in engine.adapters:
        engine.load_adapter_weights("cycle-mem", trained)
    rng = np.random.default_rng(11)
    prompts = [cycle_from(2, 9), rng.integers(0, cfg.vocab_size, 12).tolist()]
    got = engine.logits(prompts * 3, adapters=["cycle-disk"] * 2 + ["cycle-mem"] * 2 + [None] * 2)
    for i, p in enumerate(prompts):
        ref = hf_logits(llama_gqa_dir, saved, p)
        assert rel_err(got[i], ref) < 1e-4
        assert rel_err(got[2 + i], ref) < 1e-4
        assert rel_err(got[4 + i], ref) > 1e-2  # the adapter matters: the comparison is not vacuous


@pytest.mark.parametrize("name", ["patterns", "mlp_layer1", "regex", "rslora_all_r16", "k_r1"])
def test_save_round_trips_any_loaded_adapter(llama_gqa_dir, llama_adapters, cfg, tmp_path, name):
    original = load_peft_adapter(llama_adapters[name], cfg, 64, name)
    out = save_peft_adapter(original, tmp_path / name, base_model_name="llama-gqa")
    again = load_peft_adapter(out, cfg, 64, name)
    assert again.target_modules == original.target_modules
    for m, ml in original.modules.items():
        np.testing.assert_array_equal(again.modules[m].ranks, ml.ranks)
        np.testing.assert_allclose(again.modules[m].scales, ml.scales, rtol=1e-6)
        np.testing.assert_array_equal(again.modules[m].a, ml.a)
        np.testing.assert_array_equal(again.modules[m].b, ml.b)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, 10).tolist()
    assert rel_err(hf_logits(llama_gqa_dir, out, tokens), hf_logits(llama_gqa_dir, llama_adapters[name], tokens)) < 1e-6


# ------------------------------------------------------------------------------------------ hot load


@pytest.mark.slow
def test_hot_load_while_a_background_thread_serves_other_adapters(engine, saved, llama_gqa_dir, llama_adapters,
                                                                   monkeypatch):
    N = 56  # tokens per stream: prompt + output within 4 KV pages, one decode shape
    for name in ("qv_r8", "k_r1"):
        if name not in engine.adapters:
            engine.load_adapter(name, llama_adapters[name])
    # A slow disk: the adapter read takes 0.5 s, long enough to see whether serving stops meanwhile.
    real_read = adapter_store.read_paged_adapter

    def slow_read(*a, **k):
        time.sleep(0.5)
        return real_read(*a, **k)

    monkeypatch.setattr(adapter_store, "read_paged_adapter", slow_read)

    stop, failures = threading.Event(), []

    def serve():
        try:
            while not stop.is_set():
                if engine.has_unfinished():
                    engine.step()
                else:
                    time.sleep(0.001)
        except BaseException as e:  # reported by the test, not lost in the thread
            failures.append(e)

    streams: dict[str, list] = {}

    def submit(prompt, adapter, n):
        rid = f"hot-{len(streams)}"
        streams[rid] = []  # before queueing: the engine thread may call the listener at once
        engine.add_request(prompt, adapter=adapter, sampling=sj.SamplingParams(max_tokens=n, ignore_eos=True),
                           request_id=rid, listener=lambda out: streams[rid].append((time.monotonic(), out)))
        return rid

    jobs = [("qv_r8", [5, 9, 14, 3]), ("k_r1", [7, 7, 30, 2, 11]), (None, [40, 41, 42])]
    # Compile every step shape these requests will use first, so no compile falls in the load window.
    engine.generate([p for _, p in jobs] + [cycle_from(0, 5)], adapters=[a for a, _ in jobs] + ["qv_r8"],
                    sampling=sj.SamplingParams(max_tokens=N, ignore_eos=True))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        others = {submit(p, a, N): (a, p) for a, p in jobs}
        deadline = time.monotonic() + 120
        while not all(len(streams[r]) >= 2 for r in others) and time.monotonic() < deadline:
            time.sleep(0.002)
        t0 = time.monotonic()
        engine.load_adapter("cycle-hot", saved)
        t1 = time.monotonic()
        new = submit(cycle_from(0, 5), "cycle-hot", 12)
        while any(not s or not s[-1][1].finished for s in streams.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures
    assert t1 - t0 >= 0.5
    during = [sum(1 for t, _ in streams[r] if t0 <= t <= t1) for r in others]
    assert sum(during) >= 10, during  # tokens kept streaming while the adapter was being read

    for rid, (adapter, prompt) in others.items():
        final = streams[rid][-1][1]
        assert final.finished and final.finish_reason == "length"
        assert final.token_ids == hf_greedy(llama_gqa_dir, llama_adapters.get(adapter), prompt, N), adapter
        assert [len(o.token_ids) for _, o in streams[rid]] == list(range(1, N + 1))  # every step streamed
    final = streams[new][-1][1]
    assert final.token_ids == hf_greedy(llama_gqa_dir, saved, cycle_from(0, 5), 12)


# ------------------------------------------------------------------------------------------ errors


def test_bad_training_inputs_raise_clear_errors(llama_gqa_dir, cfg, engine):
    seqs = pattern_sequences(4)
    src = str(llama_gqa_dir)
    with pytest.raises(AdapterError, match="rank"):
        train_lora(src, None, seqs, rank=0, steps=1, progress=False)
    with pytest.raises(AdapterError, match="target_modules"):
        train_lora(src, None, seqs, target_modules=["lm_head"], steps=1, progress=False)
    with pytest.raises(AdapterError, match="alpha"):
        train_lora(src, None, seqs, alpha=-1, steps=1, progress=False)
    with pytest.raises(AdapterError, match="max_lora_rank"):
        train_lora(sj.Engine.from_pretrained(src, config=sj.EngineConfig(dtype="float32", num_pages=16,
                                                                          max_lora_rank=4)),
                   None, seqs, rank=8, steps=1, progress=False)
    with pytest.raises(ConfigError, match="steps"):
        train_lora(src, None, seqs, steps=0, progress=False)
    with pytest.raises(ConfigError, match="learning_rate"):
        train_lora(src, None, seqs, learning_rate=float("nan"), steps=1, progress=False)
    with pytest.raises(RequestError, match="non-empty"):
        train_lora(src, None, [], steps=1, progress=False)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        train_lora(src, None, [[1, 2, cfg.vocab_size]], steps=1, progress=False)
    with pytest.raises(RequestError, match="at least 2"):
        train_lora(src, None, [[1]], steps=1, progress=False)
    with pytest.raises(ModelError, match="model_config"):
        train_lora(load_params(src, cfg, "float32"), None, seqs, steps=1, progress=False)
    with pytest.raises(ModelError, match="do not match"):
        other = load_model_config(src)
        train_lora(load_params(src, cfg, "float32"), type(other)(**{**other.to_dict(), "num_layers": 3}), seqs,
                   steps=1, progress=False)


def test_save_refuses_broken_weights(cfg, tmp_path):
    lora = init_lora(cfg, rank=2, target_modules=["q_proj"])
    lora.modules["q_proj"].b[0, 0, 0] = np.nan
    with pytest.raises(AdapterError, match="non-finite"):
        save_peft_adapter(lora, tmp_path / "x")
    lora = init_lora(cfg, rank=2, target_modules=["q_proj"])
    lora.modules["q_proj"].ranks[:] = 0
    with pytest.raises(AdapterError, match="rank 0"):
        save_peft_adapter(lora, tmp_path / "y")
