"""The nnx Llama module on its own, as research code uses it: logits and gradients against transformers
(float32, eager), scanned and unrolled layers, and the logical axes every weight carries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slora_jax.model import Llama, from_params, load_model_config, load_params
from slora_jax.model.llama import LAYERS_AXIS, PARAM_AXES, param_axes
from sharding import DEFAULT_RULES, MODEL_AXIS, logical_spec, make_mesh
from tests.hf_reference import hf_logits, hf_model


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def padded_batch(cfg, lengths, seed=0):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens = np.zeros((len(lengths), T), np.int32)
    valid = np.zeros((len(lengths), T), bool)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(0, cfg.vocab_size, n)
        valid[i, :n] = True
    return tokens, valid


@pytest.fixture(params=["llama", "qwen2"])
def model_dir(request, llama_gqa_dir, qwen2_dir):
    return llama_gqa_dir if request.param == "llama" else qwen2_dir


@pytest.mark.parametrize("scan_layers", [True, False])
def test_module_logits_match_transformers(model_dir, scan_layers):
    cfg = load_model_config(model_dir)
    model = from_params(load_params(model_dir, cfg, "float32"), cfg, scan_layers=scan_layers)
    assert isinstance(model, Llama) and model.scan_layers == scan_layers
    assert isinstance(model.layers, nnx.List) != scan_layers
    tokens, valid = padded_batch(cfg, [11, 5, 8])

    @nnx.jit
    def logits(model, tokens, valid):
        return model.causal_lm_logits(tokens, valid)

    got = np.asarray(logits(model, tokens, valid))
    for i, n in enumerate(valid.sum(1)):
        assert rel_err(got[i, :n], hf_logits(model_dir, None, tokens[i, :n].tolist())) < 1e-5


@pytest.mark.slow  # compiles a backward pass of the unrolled model, ~10 s cold on two cores
def test_gradients_through_the_module_match_torch_autograd(llama_gqa_dir):
    import torch

    cfg = load_model_config(llama_gqa_dir)
    model = from_params(load_params(llama_gqa_dir, cfg, "float32"), cfg, scan_layers=False)
    tokens, valid = padded_batch(cfg, [9, 9], seed=4)

    def loss(model):
        logp = jax.nn.log_softmax(model.causal_lm_logits(jnp.asarray(tokens), jnp.asarray(valid))[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1))

    value, grads = nnx.value_and_grad(loss)(model)

    ref = hf_model(llama_gqa_dir)
    ref.zero_grad()
    ids = torch.tensor(tokens, dtype=torch.long)
    out = ref(input_ids=ids, labels=ids, use_cache=False)  # mean next-token loss over every row
    out.loss.backward()
    assert abs(float(value) - out.loss.item()) < 1e-5
    layer = ref.model.layers[1]
    q = cfg.q_size
    got_wq = np.asarray(grads.layers[1].attn.wqkv[...])[:, :q]  # [in, out] = torch's weight.T
    got_down = np.asarray(grads.layers[1].mlp.w_down[...])
    assert rel_err(got_wq, layer.self_attn.q_proj.weight.grad.numpy().T) < 1e-4
    assert rel_err(got_down, layer.mlp.down_proj.weight.grad.numpy().T) < 1e-4
    assert rel_err(np.asarray(grads.embed[...]), ref.model.embed_tokens.weight.grad.numpy()) < 1e-4
    ref.zero_grad()


def test_every_weight_names_its_logical_axes(llama_gqa_dir):
    cfg = load_model_config(llama_gqa_dir)
    mesh = make_mesh(1)
    for scan_layers in (True, False):
        model = nnx.eval_shape(lambda: Llama(cfg, jnp.float32, scan_layers=scan_layers))
        seen = set()
        for path, var in nnx.iter_graph(model):
            if not isinstance(var, nnx.Param):
                continue
            name = path[-1]
            axes = param_axes(var)
            base = PARAM_AXES[name]
            seen.add(name)
            assert axes == ((LAYERS_AXIS,) + base if scan_layers and "layers" in path else base), (path, axes)
            assert len(axes) == len(var.shape)
            assert all(a in DEFAULT_RULES for a in axes), axes  # one rules table maps every name
            spec = logical_spec(axes, var.shape, mesh)
            if name in ("wqkv", "w_gate_up"):
                assert spec[-1] == MODEL_AXIS and all(s is None for s in spec[:-1])
            if name in ("wo", "w_down"):
                assert spec[-2] == MODEL_AXIS and spec[-1] is None
        assert seen == {"embed", "final_norm", "lm_head", "attn_norm", "mlp_norm", "wqkv", "wo", "w_gate_up",
                        "w_down"}


# Each layout compiles a backward pass (~10 s on two cores with an empty compilation cache): the full suite
# runs them; the quick subset's training tests (tests/training) take gradients of the scanned model.
@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_gradients_match_peft_autograd_and_leave_the_base_alone(llama_gqa_dir, llama_adapters, scan_layers):
    import torch

    from slora_jax.adapters import load_peft_adapter
    from slora_jax.model.llama import attach_lora, lora_of
    from slora_jax.training import lora_params

    cfg = load_model_config(llama_gqa_dir)
    adapter = llama_adapters["rslora_all_r16"]
    model = from_params(load_params(llama_gqa_dir, cfg, "float32"), cfg, scan_layers=scan_layers)
    attach_lora(model, *lora_params(load_peft_adapter(adapter, cfg, 64, "a")))
    tokens, valid = padded_batch(cfg, [10, 10], seed=6)

    def loss(model):
        logp = jax.nn.log_softmax(model.causal_lm_logits(jnp.asarray(tokens), jnp.asarray(valid))[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    leaves = jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves and all(isinstance(v, nnx.LoRAParam) for v in leaves)  # only the LoRA weights
    graphdef, _, _ = nnx.split(model, nnx.LoRAParam, ...)
    got = lora_of(nnx.merge(graphdef, grads, nnx.state(model, nnx.Not(nnx.LoRAParam))))

    ref = hf_model(llama_gqa_dir, adapter)
    lora_weights = [p for n, p in ref.named_parameters() if "lora_" in n]
    for p in lora_weights:  # peft loads adapters frozen; the cached model is put back below
        p.requires_grad_(True)
    ref.zero_grad()
    ids = torch.tensor(tokens, dtype=torch.long)
    ref(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for l in range(cfg.num_layers):
        layer = ref.base_model.model.model.layers[l]
        for m, mod in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj)):
            a_ref = mod.lora_A["default"].weight.grad.numpy()
            b_ref = mod.lora_B["default"].weight.grad.numpy().T
            assert rel_err(np.asarray(got[m]["a"][l]), a_ref) < 1e-4, (l, m)
            assert rel_err(np.asarray(got[m]["b"][l]), b_ref) < 1e-4, (l, m)
    ref.zero_grad()
    for p in lora_weights:
        p.requires_grad_(False)
