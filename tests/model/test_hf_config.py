"""config.json parsing against what transformers itself reads from the same files."""

import json

import pytest
from transformers import AutoConfig, LlamaConfig, MistralConfig, Qwen2Config

from slora_jax.config import ModelConfig
from slora_jax.errors import ModelError
from slora_jax.model.hf_config import load_model_config, parse_model_config, to_hf_config
from slora_jax.model.random_checkpoint import tiny_llama_config

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _hf_dict(cfg_cls, tmp_path, **kw) -> dict:
    """config.json exactly as transformers writes it."""
    cfg_cls(**kw).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_llama_fixture_matches_transformers(llama_gqa_dir):
    cfg = load_model_config(llama_gqa_dir)
    hf = AutoConfig.from_pretrained(llama_gqa_dir)
    assert cfg.architecture == "llama" and cfg.name == "base"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rms_norm_eps == hf.rms_norm_eps == 1e-5
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] == 10000.0
    assert cfg.rope_scaling == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}
    assert cfg.max_position_embeddings == 256
    assert not cfg.attention_bias and not cfg.tie_word_embeddings and cfg.sliding_window is None
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    # transformers 5 writes rope in a ``rope_parameters`` dict; check that is what was parsed.
    raw = json.loads((llama_gqa_dir / "config.json").read_text())
    assert "rope_parameters" in raw and raw["rope_parameters"]["rope_type"] == "llama3"


def test_qwen2_fixture(qwen2_dir):
    cfg = load_model_config(qwen2_dir, name="qwen")
    assert cfg.architecture == "qwen2" and cfg.name == "qwen"
    assert cfg.attention_bias and cfg.tie_word_embeddings
    assert cfg.intermediate_size == 96 and cfg.rope_theta == 1e6 and cfg.rope_scaling is None
    assert cfg.sliding_window is None
    assert cfg.bos_token_id is None and cfg.eos_token_ids == (3, 4)


def test_legacy_rope_fields():
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SMALL}
    cfg = parse_model_config({**base, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == {"type": "linear", "factor": 2.0}
    cfg = parse_model_config({**base, "rope_scaling": None})
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    cfg = parse_model_config({**base, "max_position_embeddings": 1024, "rope_scaling": {
        "rope_type": "llama3", "factor": 4, "low_freq_factor": 1, "high_freq_factor": 2}})
    assert cfg.rope_scaling["original_max_position_embeddings"] == 1024  # transformers' default
    cfg = parse_model_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}})
    assert cfg.rope_theta == 1234.0 and cfg.rope_scaling is None


def test_transformers5_linear_rope(tmp_path):
    raw = _hf_dict(LlamaConfig, tmp_path, **SMALL, rope_parameters={"rope_type": "linear", "factor": 3.0,
                                                                    "rope_theta": 20000.0})
    cfg = parse_model_config(raw)
    assert cfg.rope_theta == 20000.0 and cfg.rope_scaling == {"type": "linear", "factor": 3.0}


def test_defaults_follow_transformers():
    cfg = parse_model_config({"model_type": "llama", "vocab_size": 10, "hidden_size": 32, "intermediate_size": 8,
                              "num_hidden_layers": 1, "num_attention_heads": 4})
    hf = LlamaConfig(vocab_size=10, hidden_size=32, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4)
    assert cfg.num_kv_heads == hf.num_key_value_heads == 4
    assert cfg.head_dim == hf.head_dim == 8
    assert cfg.max_position_embeddings == hf.max_position_embeddings
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert cfg.bos_token_id is None and cfg.eos_token_ids == ()


def test_mistral_sliding_window(tmp_path):
    raw = _hf_dict(MistralConfig, tmp_path, **SMALL, sliding_window=32)
    cfg = parse_model_config(raw)
    assert cfg.architecture == "mistral" and cfg.sliding_window == 32 and not cfg.attention_bias
    assert parse_model_config({**raw, "sliding_window": None}).sliding_window is None
    no_field = {k: v for k, v in raw.items() if k != "sliding_window"}
    assert parse_model_config(no_field).sliding_window == MistralConfig().sliding_window


def test_qwen2_sliding_window(tmp_path):
    raw = _hf_dict(Qwen2Config, tmp_path, **SMALL, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert parse_model_config(raw).sliding_window == 16
    off = _hf_dict(Qwen2Config, tmp_path, **SMALL, use_sliding_window=False, sliding_window=16)
    assert parse_model_config(off).sliding_window is None
    mixed = _hf_dict(Qwen2Config, tmp_path, **SMALL, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(ModelError, match="mixing sliding-window"):
        parse_model_config(mixed)


def test_to_hf_config_read_back_by_transformers():
    cfg = tiny_llama_config(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                            eos_token_ids=(2, 7), rope_theta=5e5)
    hf = LlamaConfig(**to_hf_config(cfg))
    assert parse_model_config(hf.to_dict(), name=cfg.name) == cfg
    for c in (ModelConfig("qwen2", 64, 32, 48, 2, 4, 2, 8, attention_bias=True, sliding_window=8, eos_token_ids=(1,)),
              ModelConfig("mistral", 64, 32, 48, 2, 4, 1, 8, sliding_window=16, tie_word_embeddings=True)):
        cls = Qwen2Config if c.architecture == "qwen2" else MistralConfig
        assert parse_model_config(cls(**to_hf_config(c)).to_dict()) == c


BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SMALL}


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture 'GPT2LMHeadModel'"),
    ({"architectures": None, "model_type": "gemma"}, "unsupported model_type 'gemma'"),
    ({"architectures": None, "model_type": None}, "neither 'architectures' nor 'model_type'"),
    ({"model_type": "mistral"}, "disagrees with model_type"),
    ({"hidden_size": None}, "missing required field 'hidden_size'"),
    ({"num_hidden_layers": 0}, "'num_hidden_layers' must be a positive integer"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "rope type 'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs a 'factor'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}}, "low_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}},
     "per-layer-type rope"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_size": 66, "head_dim": None}, "no head_dim"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ({"eos_token_id": "</s>"}, "eos_token_id"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
])
def test_parse_errors(change, message):
    raw = {**BASE, **change}
    raw = {k: v for k, v in raw.items() if v is not None or k in ("head_dim",)}
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_model_config(raw)


def test_load_errors(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="must be a dict"):
        load_model_config(tmp_path)
