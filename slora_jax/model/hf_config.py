"""Hugging Face ``config.json`` <-> :class:`ModelConfig` for Llama, Mistral and Qwen2 checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from slora_jax.config import ModelConfig
from slora_jax.errors import ModelError

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_HF_ARCHITECTURE = {v: k for k, v in _ARCHITECTURES.items()}

# transformers' class defaults, used when config.json leaves a field out.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}
_DEFAULT_SLIDING_WINDOW = 4096  # MistralConfig / Qwen2Config default
_DEFAULT_QWEN2_MAX_WINDOW_LAYERS = 28
_DEFAULT_ROPE_THETA = 10000.0
_SUPPORTED_ROPE = ("default", "linear", "llama3")


def _architecture(config: dict) -> str:
    archs = config.get("architectures")
    model_type = config.get("model_type")
    if archs:
        if not isinstance(archs, list) or len(archs) != 1:
            raise ModelError(f"config.json 'architectures' must list one architecture, got {archs!r}")
        arch = _ARCHITECTURES.get(archs[0])
        if arch is None:
            raise ModelError(f"unsupported architecture {archs[0]!r}; supported: {', '.join(_ARCHITECTURES)}")
        if model_type is not None and model_type != arch:
            raise ModelError(f"config.json architectures {archs[0]!r} disagrees with model_type {model_type!r}")
        return arch
    if model_type in _HF_ARCHITECTURE:
        return model_type
    if model_type is None:
        raise ModelError("config.json has neither 'architectures' nor 'model_type'")
    raise ModelError(f"unsupported model_type {model_type!r}; supported: {', '.join(_HF_ARCHITECTURE)}")


def _positive_int(config: dict, key: str, default: Any = None, required: bool = True) -> Optional[int]:
    value = config.get(key, default)
    if value is None:
        if required:
            raise ModelError(f"config.json is missing required field {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"config.json field {key!r} must be a positive integer, got {value!r}")
    return value


def _number(value: Any, what: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= minimum:
        raise ModelError(f"{what} must be a number > {minimum:g}, got {value!r}")
    return float(value)


def _rope(config: dict, max_positions: int) -> tuple[float, Optional[dict]]:
    """(rope_theta, normalised rope_scaling) from either the legacy ``rope_theta`` + ``rope_scaling`` fields or
    the ``rope_parameters`` dict that transformers 5 writes (theta inside it)."""
    # transformers gives a legacy ``rope_scaling`` priority over ``rope_parameters``.
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ModelError(f"rope parameters must be a dict, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ModelError(f"per-layer-type rope parameters are not supported: {sorted(params)}")
    theta = _number(params.get("rope_theta", config.get("rope_theta", _DEFAULT_ROPE_THETA)), "rope_theta")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        raise ModelError(f"partial_rotary_factor={partial!r} is not supported (only full rotary embeddings)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type not in _SUPPORTED_ROPE:
        raise ModelError(f"rope type {rope_type!r} is not supported; supported: {', '.join(_SUPPORTED_ROPE)}")
    if "factor" not in params:
        raise ModelError(f"rope type {rope_type!r} needs a 'factor'")
    factor = _number(params["factor"], "rope scaling factor")
    if rope_type == "linear":
        return theta, {"type": "linear", "factor": factor}
    for key in ("low_freq_factor", "high_freq_factor"):
        if key not in params:
            raise ModelError(f"llama3 rope scaling is missing {key!r}")
    low = _number(params["low_freq_factor"], "low_freq_factor")
    high = _number(params["high_freq_factor"], "high_freq_factor")
    if high <= low:
        raise ModelError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got {high} <= {low}")
    orig = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings", max_positions))
    orig = _positive_int({"original_max_position_embeddings": orig}, "original_max_position_embeddings")
    return theta, {"type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": orig}


def _sliding_window(config: dict, arch: str, num_layers: int) -> Optional[int]:
    if arch == "llama":
        return None
    window = config.get("sliding_window", _DEFAULT_SLIDING_WINDOW)
    if arch == "qwen2":
        if not config.get("use_sliding_window", False):
            window = None
        layer_types = config.get("layer_types")
        if layer_types is None:
            first = config.get("max_window_layers", _DEFAULT_QWEN2_MAX_WINDOW_LAYERS)
            layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                           for i in range(num_layers)]
        kinds = set(layer_types)
        if not kinds <= {"full_attention", "sliding_attention"}:
            raise ModelError(f"unsupported layer_types {sorted(kinds)}")
        if window is None or kinds == {"full_attention"}:
            return None  # "sliding" layers without a window attend to everything in transformers too
        if len(kinds) > 1:
            raise ModelError("layers mixing sliding-window and full attention are not supported "
                             "(Qwen2 use_sliding_window with max_window_layers < num_hidden_layers)")
    if window is None:
        return None
    return _positive_int({"sliding_window": window}, "sliding_window")


def _token_ids(value: Any, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ModelError(f"config.json {key!r} must be a token id or a list of them, got {value!r}")
    return tuple(values)


def parse_model_config(config: dict, name: str = "base") -> ModelConfig:
    """A Hugging Face config.json dict -> ModelConfig; ModelError names any unsupported or missing field."""
    if not isinstance(config, dict):
        raise ModelError(f"config must be a dict, got {type(config).__name__}")
    arch = _architecture(config)
    if config.get("quantization_config"):
        raise ModelError("quantized checkpoints (quantization_config) are not supported")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"hidden_act {act!r} is not supported (only 'silu')")
    if arch == "llama" and config.get("mlp_bias", False):
        raise ModelError("mlp_bias=true is not supported")
    if arch == "llama" and config.get("attention_bias", False):
        # Llama's attention_bias also puts a bias on o_proj, which the layout has no place for.
        raise ModelError("attention_bias=true on a Llama model (q/k/v/o biases) is not supported")

    vocab = _positive_int(config, "vocab_size")
    hidden = _positive_int(config, "hidden_size")
    inter = _positive_int(config, "intermediate_size")
    layers = _positive_int(config, "num_hidden_layers")
    heads = _positive_int(config, "num_attention_heads")
    kv_heads = _positive_int(config, "num_key_value_heads", required=False) or heads
    if heads % kv_heads:
        raise ModelError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    head_dim = _positive_int(config, "head_dim", required=False)
    if head_dim is None:
        if hidden % heads:
            raise ModelError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
                             "and config.json gives no head_dim")
        head_dim = hidden // heads
    max_pos = _positive_int(config, "max_position_embeddings", _DEFAULT_MAX_POSITIONS[arch])
    theta, scaling = _rope(config, max_pos)
    eps = _number(config.get("rms_norm_eps", 1e-6), "rms_norm_eps")
    tie = config.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ModelError(f"tie_word_embeddings must be a bool, got {tie!r}")
    bos = _token_ids(config.get("bos_token_id"), "bos_token_id")
    if len(bos) > 1:
        raise ModelError(f"bos_token_id must be one token id, got {config.get('bos_token_id')!r}")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=eps,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        attention_bias=arch == "qwen2",
        tie_word_embeddings=tie,
        sliding_window=_sliding_window(config, arch, layers),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(config.get("eos_token_id"), "eos_token_id"),
        name=name,
    )


def load_model_config(model_dir, name: str = "base") -> ModelConfig:
    """Read and validate ``model_dir/config.json``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"no config.json in {model_dir}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e
    return parse_model_config(config, name=name)


def to_hf_config(config: ModelConfig) -> dict:
    """ModelConfig -> a config.json dict that transformers (4.45+ and 5.x) and :func:`parse_model_config` read.

    Rope is written in the legacy ``rope_theta`` + ``rope_scaling`` form, which both transformers generations
    accept."""
    if config.attention_bias != (config.architecture == "qwen2"):
        # q/k/v biases come with the architecture: always in Qwen2, never in Llama/Mistral as loaded here.
        raise ModelError(f"attention_bias={config.attention_bias} cannot be expressed for {config.architecture!r}")
    scaling = None
    if config.rope_scaling is not None:
        scaling = dict(config.rope_scaling)
        scaling["rope_type"] = scaling.pop("type")
    eos = list(config.eos_token_ids)
    out = {
        "architectures": [_HF_ARCHITECTURE[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "initializer_range": 0.02,
    }
    if config.architecture == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif config.architecture == "mistral":
        out["sliding_window"] = config.sliding_window
    else:
        out.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
                   max_window_layers=0)
    return out
