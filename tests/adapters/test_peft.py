"""PEFT adapter loading against peft's own LoRA modules, and every way an adapter folder can be bad."""

import json
import shutil
import warnings

import numpy as np
import pytest
from hf_reference import hf_model
from safetensors.numpy import load_file, save_file

from slora_jax.adapters.peft import load_peft_adapter, read_adapter_config
from slora_jax.config import ATTN_MODULES, MODULES
from slora_jax.errors import AdapterError
from slora_jax.model.hf_config import load_model_config

MAX_RANK = 64


def peft_reference(model_dir, adapter_dir) -> dict:
    """(layer, module) -> (A [r, in], B [out, r], scaling) read from the LoRA layers peft built."""
    model = hf_model(model_dir, adapter_dir).base_model.model
    out = {}
    for i, layer in enumerate(model.model.layers):
        for m in MODULES:
            mod = getattr(layer.self_attn if m in ATTN_MODULES else layer.mlp, m)
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                out[(i, m)] = (mod.lora_A["default"].weight.detach().numpy(),
                               mod.lora_B["default"].weight.detach().numpy(), mod.scaling["default"])
    return out


def check_against_peft(model_dir, adapter_dir, name):
    cfg = load_model_config(model_dir)
    lw = load_peft_adapter(adapter_dir, cfg, MAX_RANK, name)
    ref = peft_reference(model_dir, adapter_dir)
    assert ref, "fixture adapter adapts nothing"
    assert lw.name == name and lw.path == str(adapter_dir)
    assert lw.target_modules == tuple(m for m in MODULES if any(k[1] == m for k in ref))
    assert sorted(lw.modules) == sorted(lw.target_modules)
    assert lw.rank == max(a.shape[0] for a, _, _ in ref.values())
    assert lw.config == json.loads((adapter_dir / "adapter_config.json").read_text())
    total = 0
    for m, ml in lw.modules.items():
        d_in, d_out = cfg.module_dims(m)
        assert ml.a.shape == (cfg.num_layers, lw.rank, d_in) and ml.a.dtype == np.float32
        assert ml.b.shape == (cfg.num_layers, lw.rank, d_out) and ml.b.dtype == np.float32
        assert ml.ranks.dtype == np.int32 and ml.scales.dtype == np.float32
        total += ml.a.nbytes + ml.b.nbytes + ml.ranks.nbytes + ml.scales.nbytes
        for i in range(cfg.num_layers):
            if (i, m) in ref:
                a, b, scaling = ref[(i, m)]
                r = a.shape[0]
                assert ml.ranks[i] == r
                assert ml.scales[i] == np.float32(scaling)
                np.testing.assert_array_equal(ml.a[i, :r], a)
                np.testing.assert_array_equal(ml.b[i, :r], b.T)
            else:
                assert ml.ranks[i] == 0 and ml.scales[i] == 0
                r = 0
            assert not ml.a[i, r:].any() and not ml.b[i, r:].any()  # padding rows are zero
    assert lw.nbytes == total
    return lw, ref


@pytest.mark.parametrize("name", ["qv_r8", "rslora_all_r16", "patterns", "mlp_layer1", "regex", "k_r1"])
def test_llama_adapters_match_peft(llama_gqa_dir, llama_adapters, name):
    lw, ref = check_against_peft(llama_gqa_dir, llama_adapters[name], name)
    # The fixture really exercises the option it is named after.
    if name == "rslora_all_r16":
        assert lw.target_modules == MODULES and np.allclose(lw.modules["q_proj"].scales, 32 / 4)
    if name == "patterns":
        assert lw.modules["q_proj"].ranks.tolist() == [8, 8]
        assert lw.modules["down_proj"].ranks.tolist() == [4, 2]
        assert lw.modules["v_proj"].scales.tolist() == [8.0, 8.0]
        assert lw.modules["o_proj"].scales.tolist() == [0.75, 2.0]
        assert lw.modules["gate_proj"].scales.tolist() == [2.0, 2.0]
    if name == "mlp_layer1":
        assert lw.target_modules == ("gate_proj", "up_proj", "down_proj")
        assert lw.modules["up_proj"].ranks.tolist() == [0, 8]
    if name == "regex":
        assert lw.target_modules == ("q_proj", "k_proj", "o_proj", "up_proj")
        assert lw.modules["q_proj"].ranks.tolist() == [6, 0] and lw.modules["up_proj"].ranks.tolist() == [6, 6]
    if name == "k_r1":
        assert lw.rank == 1 and lw.target_modules == ("k_proj",)


@pytest.mark.parametrize("name", ["qkv_r8", "all_r4"])
def test_qwen2_adapters_match_peft(qwen2_dir, qwen2_adapters, name):
    check_against_peft(qwen2_dir, qwen2_adapters[name], name)


def test_read_adapter_config_is_cheap_and_returns_config(llama_gqa_dir, llama_adapters, tmp_path):
    src = llama_adapters["qv_r8"]
    dst = tmp_path / "a"
    shutil.copytree(src, dst)
    (dst / "adapter_model.safetensors").write_bytes(b"not read")  # the weights are not opened
    cfg = read_adapter_config(dst, load_model_config(llama_gqa_dir), MAX_RANK)
    assert cfg == json.loads((src / "adapter_config.json").read_text())


# ------------------------------------------------------------------------------------------------- config forms


@pytest.fixture
def adapter_copy(llama_adapters, tmp_path):
    """copy(name) -> a writable copy of one llama adapter fixture."""
    def copy(name):
        dst = tmp_path / name
        shutil.copytree(llama_adapters[name], dst)
        return dst
    return copy


def edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_weights(adapter_dir, edit):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def load(adapter_dir, llama_gqa_dir, max_rank=MAX_RANK):
    return load_peft_adapter(adapter_dir, load_model_config(llama_gqa_dir), max_rank, "x")


def same_weights(x, y):
    assert x.target_modules == y.target_modules and x.rank == y.rank
    for m in x.modules:
        for field in ("a", "b", "ranks", "scales"):
            np.testing.assert_array_equal(getattr(x.modules[m], field), getattr(y.modules[m], field))


def test_all_linear_string_form(adapter_copy, llama_gqa_dir):
    """peft saves "all-linear" expanded to full module names; a hand-written config keeps the string."""
    d = adapter_copy("rslora_all_r16")
    ref = load(d, llama_gqa_dir)
    edit_config(d, target_modules="all-linear")
    same_weights(load(d, llama_gqa_dir), ref)


def test_layers_to_transform_int_and_pattern(adapter_copy, llama_gqa_dir):
    d = adapter_copy("mlp_layer1")
    ref = load(d, llama_gqa_dir)
    edit_config(d, layers_to_transform=1)
    same_weights(load(d, llama_gqa_dir), ref)
    edit_config(d, layers_to_transform=[1], layers_pattern="layers")
    same_weights(load(d, llama_gqa_dir), ref)
    edit_config(d, layers_to_transform=[1], layers_pattern=["h", "layers"])
    same_weights(load(d, llama_gqa_dir), ref)


def test_fan_in_fan_out_reset_with_warning(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")
    ref = load(d, llama_gqa_dir)
    edit_config(d, fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        same_weights(load(d, llama_gqa_dir), ref)


def test_target_modules_default(adapter_copy, llama_gqa_dir):
    """No target_modules: peft's default for Llama is q_proj and v_proj."""
    d = adapter_copy("qv_r8")
    ref = load(d, llama_gqa_dir)
    edit_config(d, target_modules=None)
    same_weights(load(d, llama_gqa_dir), ref)


def test_float16_weights_upcast(adapter_copy, llama_gqa_dir):
    d = adapter_copy("k_r1")
    edit_weights(d, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
    lw = load(d, llama_gqa_dir)
    ref = load_file(d / "adapter_model.safetensors")
    a = ref["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].astype(np.float32)
    np.testing.assert_array_equal(lw.modules["k_proj"].a[1, :1], a)


def test_no_warnings_on_plain_adapter(llama_adapters, llama_gqa_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(llama_adapters["patterns"], llama_gqa_dir)


# ------------------------------------------------------------------------------------------------- errors

A = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.{}.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, r"DoRA \(use_dora\) is not supported"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save \['lm_head'\] is not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
    ({"peft_type": "IA3"}, "peft_type must be 'LORA', got 'IA3'"),
    ({"use_qalora": True}, "QA-LoRA"),
    ({"lora_bias": True}, "lora_bias"),
    ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"layer_replication": [[0, 2], [0, 2]]}, "layer_replication"),
    ({"alora_invocation_tokens": [5]}, "alora"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "LoRA on 'model.embed_tokens'"),
    ({"target_modules": ["c_attn"]}, "matches none of the projections"),
    ({"target_modules": "(unclosed"}, "not a valid regex"),
    ({"r": 65}, r"rank of model.layers.0.self_attn.q_proj is 65, above the engine's max_lora_rank 64"),
    ({"r": 0}, "must be a positive integer"),
    ({"rank_pattern": {"layers.1.self_attn.v_proj": 100}}, "is 100, above the engine's max_lora_rank 64"),
    ({"lora_alpha": "big"}, "lora_alpha must be a finite number"),
])
def test_config_errors(adapter_copy, llama_gqa_dir, changes, message):
    d = adapter_copy("qv_r8")
    edit_config(d, **changes)
    with pytest.raises(AdapterError, match=message):
        read_adapter_config(d, load_model_config(llama_gqa_dir), MAX_RANK)
    with pytest.raises(AdapterError, match=message):
        load(d, llama_gqa_dir)


def test_overlapping_rank_patterns_follow_saved_order(llama_gqa_dir, tmp_path):
    """peft saves patterns sorted, and on reload the first match in that order wins: here "down_proj" (3)
    shadows "layers.1.mlp.down_proj" (2), which the weights were made with. peft refuses the reload; so do we."""
    from conftest import build_adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = build_adapter(llama_gqa_dir, tmp_path / "overlap", seed=3, r=4, lora_alpha=8, target_modules=["down_proj"],
                      rank_pattern={"layers.1.mlp.down_proj": 2, "down_proj": 3})
    assert list(json.loads((d / "adapter_config.json").read_text())["rank_pattern"]) == [
        "down_proj", "layers.1.mlp.down_proj"]
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_gqa_dir), d)
    with pytest.raises(AdapterError, match=r"layers.1.mlp.down_proj.lora_A.weight' has shape \[2, 128\], "
                                           r"expected \[3, 128\]"):
        load(d, llama_gqa_dir)


def test_rank_above_max(llama_adapters, llama_gqa_dir):
    with pytest.raises(AdapterError, match="is 8, above the engine's max_lora_rank 4"):
        load(llama_adapters["qv_r8"], llama_gqa_dir, max_rank=4)
    # rank_pattern decides: only q_proj is above 4 in "patterns", its other modules are rank 4 and 2.
    with pytest.raises(AdapterError, match="q_proj is 8, above the engine's max_lora_rank 4"):
        load(llama_adapters["patterns"], llama_gqa_dir, max_rank=4)
    assert load(llama_adapters["patterns"], llama_gqa_dir, max_rank=8).rank == 8


def test_missing_files(adapter_copy, llama_gqa_dir, tmp_path):
    d = adapter_copy("qv_r8")
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load(d, llama_gqa_dir)
    d = adapter_copy("k_r1")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        load(d, llama_gqa_dir)
    (d / "adapter_model.bin").write_bytes(b"\0")
    with pytest.raises(AdapterError, match="only adapter_model.bin.*safe_serialization=True"):
        load(d, llama_gqa_dir)
    with pytest.raises(AdapterError, match="does not exist"):
        load(tmp_path / "nowhere", llama_gqa_dir)


def test_bad_config_json(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")
    (d / "adapter_config.json").write_text("{oops")
    with pytest.raises(AdapterError, match="cannot read"):
        load(d, llama_gqa_dir)


def test_truncated_weights(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load(d, llama_gqa_dir)


def test_nan_weight(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")

    def edit(t):
        t[B.format(1)][3, 2] = np.nan
    edit_weights(d, edit)
    with pytest.raises(AdapterError, match=f"tensor '{B.format(1)}' has non-finite values"):
        load(d, llama_gqa_dir)


def test_inf_weight(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")
    edit_weights(d, lambda t: t[A.format(0)].__setitem__((0, 0), np.inf))
    with pytest.raises(AdapterError, match="non-finite"):
        load(d, llama_gqa_dir)


def test_lora_on_lm_head(llama_gqa_dir, tmp_path):
    from conftest import build_adapter

    d = build_adapter(llama_gqa_dir, tmp_path / "head", seed=7, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterError, match="LoRA on 'lm_head'"):
        load(d, llama_gqa_dir)
    # The same tensors with a config that does not mention lm_head: the weights file is refused on its own.
    edit_config(d, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="base_model.model.lm_head.lora_A.weight.*LoRA on 'lm_head'"):
        load(d, llama_gqa_dir)


def test_lora_on_embeddings_tensor(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")
    edit_weights(d, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A":
                                        np.zeros((8, 128), np.float32)}))
    with pytest.raises(AdapterError, match="LoRA on embeddings is not supported"):
        load(d, llama_gqa_dir)


@pytest.mark.parametrize("extra, message", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "unexpected tensor"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "modules_to_save"),
    ("base_model.model.model.layers.0.mlp.fc1.lora_A.weight", "LoRA on 'model.layers.0.mlp.fc1' is not supported"),
    ("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight", "LoRA on 'model.layers.0.mlp.q_proj'"),
    ("model.layers.0.self_attn.q_proj.weight", "PEFT LoRA tensors start with 'base_model.model.'"),
])
def test_unexpected_tensors(adapter_copy, llama_gqa_dir, extra, message):
    d = adapter_copy("qv_r8")
    edit_weights(d, lambda t: t.update({extra: np.zeros((8, 64), np.float32)}))
    with pytest.raises(AdapterError, match=message):
        load(d, llama_gqa_dir)


def test_wrong_shapes(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")
    edit_weights(d, lambda t: t.update({A.format(0): np.zeros((8, 32), np.float32)}))
    with pytest.raises(AdapterError, match=rf"'{A.format(0)}' has shape \[8, 32\], expected \[8, 64\]"):
        load(d, llama_gqa_dir)
    d = adapter_copy("k_r1")
    edit_weights(d, lambda t: t.update({
        "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight": np.zeros((64, 1), np.float32)}))
    with pytest.raises(AdapterError, match=r"has shape \[64, 1\], expected \[32, 1\]"):
        load(d, llama_gqa_dir)


def test_rank_in_file_disagrees_with_config(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")
    edit_config(d, r=4)
    with pytest.raises(AdapterError, match=r"has shape \[8, 64\], expected \[4, 64\]"):
        load(d, llama_gqa_dir)


def test_adapter_for_another_base(llama_adapters, llama_gqa_dir):
    wider = load_model_config(llama_gqa_dir).__class__(**{
        **load_model_config(llama_gqa_dir).to_dict(), "hidden_size": 128, "head_dim": 32})
    with pytest.raises(AdapterError, match="expected"):
        load_peft_adapter(llama_adapters["qv_r8"], wider, MAX_RANK, "x")


def test_layer_out_of_range(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")

    def edit(t):
        t[A.format(5)] = t.pop(A.format(1))
        t[B.format(5)] = t.pop(B.format(1))
    edit_weights(d, edit)
    with pytest.raises(AdapterError, match="layer 5, but the base model has 2 layers"):
        load(d, llama_gqa_dir)


def test_missing_lora_b(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")
    edit_weights(d, lambda t: t.pop(B.format(0)))
    with pytest.raises(AdapterError, match="no lora_B weight for 'model.layers.0.self_attn.q_proj'"):
        load(d, llama_gqa_dir)


def test_weights_not_targeted_by_config(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")
    edit_config(d, target_modules=["v_proj"])
    with pytest.raises(AdapterError, match="weights for 'model.layers.0.self_attn.q_proj', which adapter_config.json "
                                           "does not target"):
        load(d, llama_gqa_dir)
    d = adapter_copy("rslora_all_r16")
    edit_config(d, exclude_modules=["model.layers.0.mlp.up_proj"])
    with pytest.raises(AdapterError, match="'model.layers.0.mlp.up_proj', which adapter_config.json does not target"):
        load(d, llama_gqa_dir)


def test_targeted_module_without_weights(adapter_copy, llama_gqa_dir):
    d = adapter_copy("qv_r8")
    edit_weights(d, lambda t: [t.pop(A.format(1)), t.pop(B.format(1))])
    with pytest.raises(AdapterError, match="targets 'model.layers.1.self_attn.q_proj' but adapter_model.safetensors "
                                           "has no weights for it"):
        load(d, llama_gqa_dir)


def test_bad_name(llama_adapters, llama_gqa_dir):
    with pytest.raises(AdapterError, match="non-empty string"):
        load_peft_adapter(llama_adapters["qv_r8"], load_model_config(llama_gqa_dir), MAX_RANK, "")


# ------------------------------------------------------------------------------------------------- random adapters


@pytest.mark.parametrize("kw", [
    dict(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
    dict(rank=8, alpha=4, target_modules=MODULES, use_rslora=True),
    dict(rank=2, alpha=2, target_modules=("o_proj", "down_proj"), layers_to_transform=[1]),
])
def test_random_adapter_reads_like_peft(llama_gqa_dir, tmp_path, kw):
    from slora_jax.model.random_checkpoint import write_random_adapter

    cfg = load_model_config(llama_gqa_dir)
    d = write_random_adapter(tmp_path / "rand", cfg, seed=5, **kw)
    lw, ref = check_against_peft(llama_gqa_dir, d, "rand")
    assert {m for _, m in ref} == set(kw["target_modules"])
    assert all(np.abs(b).max() > 0 for _, b, _ in ref.values())  # B is nonzero: the adapter does something


def test_random_adapter_rejects_bad_arguments(tmp_path):
    from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter

    cfg = tiny_llama_config()
    with pytest.raises(AdapterError, match="target_modules"):
        write_random_adapter(tmp_path / "a", cfg, target_modules=("lm_head",))
    with pytest.raises(AdapterError, match="out of range"):
        write_random_adapter(tmp_path / "b", cfg, layers_to_transform=[2])
    with pytest.raises(AdapterError, match="rank"):
        write_random_adapter(tmp_path / "c", cfg, rank=0)
