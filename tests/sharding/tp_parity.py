"""TP=2 and TP=4 engines against transformers+peft (run by test_tensor_parallel.py in a fresh process).

Both families of the fixtures, both kernel backends, every adapter of the fixtures, chunked prefill: logits
within 1e-4 and equal greedy tokens. Needs 4 (simulated) devices, which tests/conftest.py provides.
"""

import numpy as np
import pytest

import slora_jax as sj
from tests.hf_reference import hf_greedy, hf_logits


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _engine(model_dir, adapters, tp, backend, **kw):
    eng = sj.Engine.from_pretrained(model_dir, config=sj.EngineConfig(
        dtype="float32", kernel_backend=backend, num_pages=256, max_lora_rank=64, tensor_parallel=tp, **kw))
    for name, d in adapters.items():
        eng.load_adapter(name, d)
    return eng


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tensor_parallel_equals_references(request, family, backend, tp):
    model_dir = request.getfixturevalue("llama_gqa_dir" if family == "llama" else "qwen2_dir")
    adapters = request.getfixturevalue("llama_adapters" if family == "llama" else "qwen2_adapters")
    # max_prefill_tokens=8 splits the longer prompts into chunks that continue over mixed steps.
    eng = _engine(model_dir, adapters, tp, backend, max_batch_size=8, max_prefill_tokens=8)
    assert eng.runner.tp == tp
    names = [None] + list(adapters)
    rng = np.random.default_rng(tp)
    prompts = [rng.integers(0, 128, size=int(rng.integers(3, 14))).tolist() for _ in names]
    for p, name, lg in zip(prompts, names, eng.logits(prompts, adapters=names)):
        assert rel_err(lg, hf_logits(model_dir, adapters.get(name), p)) < 1e-4, name
    outs = eng.generate(prompts, adapters=names, sampling=sj.SamplingParams(max_tokens=5, ignore_eos=True))
    for p, name, out in zip(prompts, names, outs):
        assert out.token_ids == hf_greedy(model_dir, adapters.get(name), p, 5), name
    assert eng.stats()["kv_pages"] == 0
    eng.close()
