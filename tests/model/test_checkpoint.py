"""Checkpoint loading against transformers' own state dicts, and every way a checkpoint can be bad."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from slora_jax.config import ModelConfig
from slora_jax.errors import ModelError
from slora_jax.model.checkpoint import Tokenizer, estimate_param_bytes, load_params, load_tokenizer
from slora_jax.model.hf_config import load_model_config
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_checkpoint

LINEAR = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
MLP = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}


def expected_params(model_dir, cast=None) -> dict:
    """The load_params layout built independently from transformers' state dict (optionally torch-cast)."""
    sd = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    cfg = load_model_config(model_dir)

    def get(name, transpose=False):
        t = sd[name]
        t = t.T.contiguous() if transpose else t
        if cast is not None:
            t = t.to(cast).view(torch.int16).numpy().view(ml_dtypes.bfloat16)  # torch's own rounding
        else:
            t = t.numpy()
        return t

    layers = {k: [] for k in ("attn_norm", "mlp_norm", *LINEAR.values(), *MLP.values())}
    if cfg.attention_bias:
        layers.update(bq=[], bk=[], bv=[])
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layers["attn_norm"].append(get(p + "input_layernorm.weight"))
        layers["mlp_norm"].append(get(p + "post_attention_layernorm.weight"))
        for hf, ours in LINEAR.items():
            layers[ours].append(get(p + f"self_attn.{hf}.weight", True))
        for hf, ours in MLP.items():
            layers[ours].append(get(p + f"mlp.{hf}.weight", True))
        if cfg.attention_bias:
            for x in "qkv":
                layers[f"b{x}"].append(get(p + f"self_attn.{x}_proj.bias"))
    out = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight"),
           "layers": {k: np.stack(v) for k, v in layers.items()}}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = get("lm_head.weight", True)
    return out


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    assert sorted(got["layers"]) == sorted(want["layers"])
    for k in want:
        if k == "layers":
            continue
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for k in want["layers"]:
        g, w = got["layers"][k], want["layers"][k]
        assert g.dtype == w.dtype and g.shape == w.shape, k
        np.testing.assert_array_equal(g, w, err_msg=k)


@pytest.mark.parametrize("fixture", ["llama_gqa_dir", "qwen2_dir"])
def test_float32_equals_state_dict(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    cfg = load_model_config(model_dir)
    params = load_params(model_dir, cfg, "float32")
    want = expected_params(model_dir)
    assert_same(params, want)
    assert ("bq" in params["layers"]) == (fixture == "qwen2_dir")
    assert ("lm_head" in params) == (fixture == "llama_gqa_dir")
    if fixture == "qwen2_dir":
        assert np.abs(params["layers"]["bq"]).max() > 0  # the fixture's biases are really nonzero
    nbytes = sum(v.nbytes for k, v in params.items() if k != "layers") + sum(
        v.nbytes for v in params["layers"].values())
    assert estimate_param_bytes(cfg, "float32") == nbytes
    assert estimate_param_bytes(cfg, "bfloat16") == nbytes // 2


@pytest.mark.parametrize("fixture", ["llama_gqa_dir", "qwen2_dir"])
def test_bfloat16_equals_torch_cast(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    params = load_params(model_dir, load_model_config(model_dir), "bfloat16")
    assert_same(params, expected_params(model_dir, cast=torch.bfloat16))


def test_float16(llama_gqa_dir):
    params = load_params(llama_gqa_dir, load_model_config(llama_gqa_dir), "float16")
    sd = LlamaForCausalLM.from_pretrained(llama_gqa_dir).state_dict()
    np.testing.assert_array_equal(params["layers"]["w_down"][1],
                                  sd["model.layers.1.mlp.down_proj.weight"].half().T.numpy())


def test_sharded_checkpoint_same_params(llama_gqa_dir, tmp_path):
    model = LlamaForCausalLM.from_pretrained(llama_gqa_dir)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    cfg = load_model_config(tmp_path)
    assert_same(load_params(tmp_path, cfg, "float32"), expected_params(llama_gqa_dir))


def test_bfloat16_checkpoint_file(llama_gqa_dir, tmp_path):
    """A checkpoint stored in bf16 loads bit-exactly into bf16 and exactly into float32."""
    LlamaForCausalLM.from_pretrained(llama_gqa_dir).to(torch.bfloat16).save_pretrained(tmp_path)
    cfg = load_model_config(tmp_path)
    want = expected_params(llama_gqa_dir, cast=torch.bfloat16)
    assert_same(load_params(tmp_path, cfg, "bfloat16"), want)
    f32 = load_params(tmp_path, cfg, "float32")
    np.testing.assert_array_equal(f32["embed"], want["embed"].astype(np.float32))


@pytest.mark.parametrize("shards, dtype", [(1, "float32"), (3, "float32"), (2, "bfloat16")])
def test_random_checkpoint_roundtrip(tmp_path, shards, dtype):
    cfg = tiny_llama_config(rope_scaling={"type": "linear", "factor": 2.0}, eos_token_ids=(2, 5))
    out = write_random_checkpoint(tmp_path / "m", cfg, seed=3, dtype=dtype, shards=shards)
    assert load_model_config(out, name=cfg.name) == cfg
    assert len(list(out.glob("*.safetensors"))) == shards
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.rope_parameters["rope_type"] == "linear" and hf.config.rope_parameters["factor"] == 2.0
    assert hf.config.num_key_value_heads == 2 and hf.config.head_dim == 16
    want = expected_params(out)
    params = load_params(out, cfg, "float32")
    assert_same(params, want)
    norm = params["layers"]["attn_norm"]
    assert abs(norm.mean() - 1.0) < 0.05 and 0.01 < params["embed"].std() < 0.03
    logits = hf(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_random_qwen2_checkpoint_loads_in_transformers(tmp_path):
    cfg = ModelConfig("qwen2", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=1, head_dim=8, attention_bias=True, tie_word_embeddings=True, eos_token_ids=(3,))
    out = write_random_checkpoint(tmp_path / "q", cfg, seed=4)
    assert load_model_config(out) == cfg
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(hf).__name__ == "Qwen2ForCausalLM" and hf.config.tie_word_embeddings
    params = load_params(out, cfg, "float32")
    assert_same(params, expected_params(out))
    assert np.abs(params["layers"]["bk"]).max() > 0


def test_random_checkpoint_differs_by_seed(tmp_path):
    cfg = tiny_llama_config()
    a = load_params(write_random_checkpoint(tmp_path / "a", cfg, seed=0), cfg, "float32")
    b = load_params(write_random_checkpoint(tmp_path / "b", cfg, seed=1), cfg, "float32")
    c = load_params(write_random_checkpoint(tmp_path / "c", cfg, seed=0), cfg, "float32")
    assert not np.array_equal(a["embed"], b["embed"])
    np.testing.assert_array_equal(a["layers"]["wq"], c["layers"]["wq"])


# ------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def llama_copy(llama_gqa_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(llama_gqa_dir, dst)
    return dst


def _rewrite(model_dir, edit):
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _load(model_dir):
    return load_params(model_dir, load_model_config(model_dir), "float32")


def test_no_safetensors(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        _load(llama_copy)
    (llama_copy / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelError, match="pytorch_model.bin; convert it to safetensors"):
        _load(llama_copy)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_params(tmp_path / "nope", tiny_llama_config(), "float32")


def test_missing_tensor(llama_copy):
    _rewrite(llama_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        _load(llama_copy)


def test_missing_lm_head_when_untied(llama_copy):
    _rewrite(llama_copy, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ModelError, match="missing tensor 'lm_head.weight'"):
        _load(llama_copy)


def test_wrong_shape(llama_copy):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    _rewrite(llama_copy, edit)
    with pytest.raises(ModelError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[64, 64\], "
                                         r"expected \[32, 64\]"):
        _load(llama_copy)


def test_unknown_dtype(llama_copy):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
    _rewrite(llama_copy, edit)
    with pytest.raises(ModelError, match="'model.norm.weight' has unsupported dtype I32"):
        _load(llama_copy)


def test_unexpected_tensor(llama_copy):
    def edit(t):
        t["model.layers.0.self_attn.o_proj.bias"] = np.zeros((64,), np.float32)
    _rewrite(llama_copy, edit)
    with pytest.raises(ModelError, match="does not use: model.layers.0.self_attn.o_proj.bias"):
        _load(llama_copy)


def test_rotary_buffers_ignored(llama_copy, llama_gqa_dir):
    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((8,), np.float32)
    _rewrite(llama_copy, edit)
    assert_same(_load(llama_copy), expected_params(llama_gqa_dir))


def test_tied_checkpoint_with_saved_head(qwen2_dir, tmp_path):
    dst = tmp_path / "q"
    shutil.copytree(qwen2_dir, dst)
    _rewrite(dst, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    params = _load(dst)
    assert "lm_head" not in params


def test_truncated_file(llama_copy):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelError, match="corrupt or truncated safetensors file"):
        _load(llama_copy)


def test_corrupt_header(llama_copy):
    (llama_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header!!")
    with pytest.raises(ModelError, match="corrupt or truncated"):
        _load(llama_copy)


def test_index_missing_shard(llama_gqa_dir, tmp_path):
    LlamaForCausalLM.from_pretrained(llama_gqa_dir).save_pretrained(tmp_path, max_shard_size="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelError, match=f"references shard '{shard.name}'"):
        _load(tmp_path)


def test_index_without_weight_map(llama_copy):
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ModelError, match="has no weight_map"):
        _load(llama_copy)


def test_duplicate_tensor_across_files(llama_copy):
    (llama_copy / "model.safetensors").rename(llama_copy / "part-a.safetensors")
    save_file({"model.norm.weight": np.ones((64,), np.float32)}, llama_copy / "part-b.safetensors")
    with pytest.raises(ModelError, match="'model.norm.weight' appears in both"):
        _load(llama_copy)


def test_bad_dtype_argument(llama_gqa_dir):
    with pytest.raises(ModelError, match="dtype must be one of"):
        load_params(llama_gqa_dir, load_model_config(llama_gqa_dir), "float64")


def test_config_mismatch(llama_gqa_dir):
    wrong = tiny_llama_config(vocab_size=128, intermediate_size=256)
    with pytest.raises(ModelError, match="expected \\[256, 64\\]"):
        load_params(llama_gqa_dir, wrong, "float32")


# ------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    assert load_tokenizer(tmp_path) is None and Tokenizer.from_dir(tmp_path) is None
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = HFTokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}assistant:{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>"}, "bos_token": "<s>", "chat_template": template}))
    t = Tokenizer.from_dir(tmp_path, tiny_llama_config(eos_token_ids=(4,)))
    assert t.encode("hello world") == [3, 4]
    assert t.decode([1, 3, 4, 2]) == "hello world"
    assert t.eos_token_ids == (4, 2) and t.vocab_size == 5
    assert t.render_chat([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelError, match="cannot read"):
        load_tokenizer(tmp_path)
