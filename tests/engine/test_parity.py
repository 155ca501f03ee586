"""Parity with transformers + PEFT (float32) on random checkpoints saved by save_pretrained.

Logits of the base model and of every adapter within 1e-4 relative error, and greedy continuations
equal, for a GQA Llama (llama3 rope scaling) and a Qwen2 with q/k/v bias and tied embeddings; a mixed
batch of all adapters gives the same tokens as the references run request by request.
"""

import numpy as np
import pytest

import slora_jax as sj
from tests.hf_reference import hf_greedy, hf_logits

MAX_NEW = 8


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _engine(model_dir, adapters, backend="xla", tensor_parallel=1, scan_layers=None):
    eng = sj.Engine.from_pretrained(model_dir, config=sj.EngineConfig(
        dtype="float32", kernel_backend=backend, num_pages=256, max_lora_rank=64, tensor_parallel=tensor_parallel,
        scan_layers=scan_layers))
    for name, d in adapters.items():
        eng.load_adapter(name, d)
    return eng


def _prompts(vocab, n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(4, 12))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def llama_engine(llama_gqa_dir, llama_adapters):
    return _engine(llama_gqa_dir, llama_adapters)


@pytest.fixture(scope="module")
def qwen_engine(qwen2_dir, qwen2_adapters):
    return _engine(qwen2_dir, qwen2_adapters)


def _check_model(engine, model_dir, adapters, seed):
    vocab = engine.model_config.vocab_size
    names = [None] + list(adapters)
    prompts = _prompts(vocab, len(names), seed)
    got = engine.logits(prompts, adapters=names)
    for p, name, lg in zip(prompts, names, got):
        ref = hf_logits(model_dir, adapters.get(name), p)
        assert lg.shape == ref.shape
        assert rel_err(lg, ref) < 1e-4, name
    sp = sj.SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    outs = engine.generate(prompts, adapters=names, sampling=sp)  # one mixed batch
    distinct = set()
    for p, name, out in zip(prompts, names, outs):
        ref = hf_greedy(model_dir, adapters.get(name), p, MAX_NEW)
        assert out.token_ids == ref, name
        distinct.add(tuple(hf_greedy(model_dir, adapters.get(name), prompts[0], MAX_NEW)))
    # The adapters must matter, or the comparison above proves little.
    assert len(distinct) > 1


@pytest.mark.slow
def test_llama_gqa_parity_base_and_every_adapter(llama_engine, llama_gqa_dir, llama_adapters):
    _check_model(llama_engine, llama_gqa_dir, llama_adapters, seed=0)


@pytest.mark.slow
def test_qwen2_bias_tied_parity(qwen_engine, qwen2_dir, qwen2_adapters):
    _check_model(qwen_engine, qwen2_dir, qwen2_adapters, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_unrolled_layers_parity(request, family):
    """Layers unrolled, as GPU engines run them: the step programs then take the norm vectors (and Qwen2's
    replicated biases) packed into one argument, which the scanned CPU default never does."""
    model_dir = request.getfixturevalue("llama_gqa_dir" if family == "llama" else "qwen2_dir")
    adapters = request.getfixturevalue("llama_adapters" if family == "llama" else "qwen2_adapters")
    engine = _engine(model_dir, adapters, scan_layers=False)
    try:
        _check_model(engine, model_dir, adapters, seed=2)
    finally:
        engine.close()


def test_mixed_batch_with_repeats_equals_per_request_references(llama_engine, llama_gqa_dir, llama_adapters):
    names = [None] + list(llama_adapters)
    rng = np.random.default_rng(7)
    picks = [names[i] for i in rng.integers(0, len(names), size=10)]
    prompts = _prompts(llama_engine.model_config.vocab_size, 10, seed=8)
    outs = llama_engine.generate(prompts, adapters=picks, sampling=sj.SamplingParams(max_tokens=6, ignore_eos=True))
    for p, name, out in zip(prompts, picks, outs):
        assert out.token_ids == hf_greedy(llama_gqa_dir, llama_adapters.get(name), p, 6), name


@pytest.mark.slow
def test_pallas_backend_equals_references(llama_gqa_dir, llama_adapters):
    """The Pallas kernels (interpret mode on CPU) give the same logits and tokens as transformers+peft."""
    some = dict(list(llama_adapters.items())[:3])
    eng = _engine(llama_gqa_dir, some, backend="pallas")
    names = [None] + list(some)
    prompts = _prompts(eng.model_config.vocab_size, len(names), seed=3)
    for p, name, lg in zip(prompts, names, eng.logits(prompts, adapters=names)):
        assert rel_err(lg, hf_logits(llama_gqa_dir, some.get(name), p)) < 1e-4, name
    outs = eng.generate(prompts, adapters=names, sampling=sj.SamplingParams(max_tokens=4, ignore_eos=True))
    for p, name, out in zip(prompts, names, outs):
        assert out.token_ids == hf_greedy(llama_gqa_dir, some.get(name), p, 4), name


def _save_random(model, out_dir, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("arch,tp", [("mistral-sliding-window", 1), ("llama-linear-rope", 1),
                                     ("mistral-sliding-window", 2)])
def test_mistral_sliding_window_and_linear_rope_parity(tmp_path, arch, tp):
    """Prompts longer than the window (Mistral) and positions scaled by a linear rope factor (Llama); the
    window also under tensor parallelism (tests/sharding covers the other families at TP=2 and 4)."""
    import jax
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from tests.conftest import build_adapter

    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices (tests/test_multi_device.py runs it so)")

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch.startswith("mistral"):
        model = MistralForCausalLM(MistralConfig(sliding_window=5, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.5}, **common))
    model_dir = _save_random(model, tmp_path / "model", seed=3)
    adapter = build_adapter(model_dir, tmp_path / "lora", seed=4, r=8, lora_alpha=16, target_modules="all-linear")
    eng = _engine(model_dir, {"lora": adapter}, tensor_parallel=tp)
    if arch.startswith("mistral"):
        assert eng.model_config.sliding_window == 5
    else:
        assert eng.model_config.rope_scaling == {"type": "linear", "factor": 2.5}
    prompts = _prompts(128, 2, seed=5)
    prompts = [p + p for p in prompts]  # 8-22 tokens: well past the window of 5
    names = [None, "lora"]
    for p, name, lg in zip(prompts, names, eng.logits(prompts, adapters=names)):
        assert rel_err(lg, hf_logits(model_dir, adapter if name else None, p)) < 1e-4, name
    outs = eng.generate(prompts, adapters=names, sampling=sj.SamplingParams(max_tokens=6, ignore_eos=True))
    for p, name, out in zip(prompts, names, outs):
        assert out.token_ids == hf_greedy(model_dir, adapter if name else None, p, 6), name


# Every case compiles step programs of its own (a 4-request, 16-token step budget; ~6-15 s each on two cores with
# an empty compilation cache): the full suite runs them; the quick subset's parity test is the mixed batch above.
@pytest.mark.slow
@pytest.mark.parametrize("family,backend", [("llama", "xla"), ("llama", "pallas"), ("qwen2", "xla")])
def test_chunked_prefill_in_mixed_steps_equals_references(request, family, backend):
    """A step budget of 16 tokens splits 20-40 token prompts into chunks that continue over several steps,
    their K/V already in the pool, while other requests decode in the same steps: greedy tokens equal
    transformers+peft request by request."""
    model_dir = request.getfixturevalue("llama_gqa_dir" if family == "llama" else "qwen2_dir")
    adapters = request.getfixturevalue("llama_adapters" if family == "llama" else "qwen2_adapters")
    some = dict(list(adapters.items())[:3]) if backend == "pallas" else adapters
    eng = sj.Engine.from_pretrained(model_dir, config=sj.EngineConfig(
        dtype="float32", kernel_backend=backend, num_pages=256, max_lora_rank=64, max_batch_size=4,
        max_prefill_tokens=16))
    for name, d in some.items():
        eng.load_adapter(name, d)
    names = [None] + list(some)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 128, size=int(rng.integers(20, 41))).tolist() for _ in names]
    outs = eng.generate(prompts, adapters=names, sampling=sj.SamplingParams(max_tokens=5, ignore_eos=True))
    stats = eng.stats()
    assert stats["mixed_steps"] > len(prompts)  # prompts took several steps each
    assert stats["prefill_tokens"] >= sum(map(len, prompts))
    for p, name, out in zip(prompts, names, outs):
        assert out.token_ids == hf_greedy(model_dir, some.get(name), p, 5), name
    assert eng.stats()["kv_pages"] == 0  # every page came back
