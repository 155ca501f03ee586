"""Random Hugging Face checkpoints and PEFT LoRA adapters, written with numpy only (no torch).

Used by the demo, the benchmarks and tests that need a model of a given shape rather than a trained one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from safetensors.numpy import save_file

from slora_jax.config import MODULES, ModelConfig
from slora_jax.errors import AdapterError, ModelError
from slora_jax.model.checkpoint import numpy_dtype, tensor_slots
from slora_jax.model.hf_config import to_hf_config


def tiny_llama_config(**overrides) -> ModelConfig:
    """A laptop-sized Llama shape: vocab 256, hidden 64, intermediate 128, 2 layers, 4 heads / 2 kv heads."""
    base = dict(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,), name="tiny-llama")
    base.update(overrides)
    return ModelConfig(**base)


def _random_tensors(config: ModelConfig, rng: np.random.Generator, std: float) -> dict[str, np.ndarray]:
    """HF-named float32 tensors: linear/embedding weights ~ N(0, std), norm weights ~ 1 + N(0, std)."""
    out = {}
    for name, slot in tensor_slots(config).items():
        x = rng.standard_normal(slot.hf_shape, dtype=np.float32) * np.float32(std)
        if name.endswith("norm.weight"):
            x += np.float32(1.0)
        out[name] = x
    return out


def write_random_checkpoint(out_dir, config: ModelConfig, seed: int = 0, dtype: str = "float32",
                            shards: int = 1, std: float = 0.02) -> Path:
    """Write a random HF checkpoint folder (config.json + model.safetensors, or ``shards`` shards with
    model.safetensors.index.json) that transformers and :func:`load_params` both read. Returns the folder."""
    if not isinstance(shards, int) or shards < 1:
        raise ModelError(f"shards must be a positive integer, got {shards!r}")
    target = numpy_dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.astype(target) for k, v in _random_tensors(config, np.random.default_rng(seed), std).items()}
    (out / "config.json").write_text(json.dumps(to_hf_config(config), indent=2))

    names = list(tensors)
    shards = min(shards, len(names))
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for s, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[i]: tensors[names[i]] for i in part}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({names[i]: fname for i in part})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def _peft_config(config: ModelConfig, rank: int, alpha: float, target_modules: Sequence[str],
                 use_rslora: bool, layers_to_transform) -> dict:
    """adapter_config.json as peft's LoraConfig.save_pretrained writes it (the fields that matter here)."""
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": config.name, "bias": "none",
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": layers_to_transform,
        "loftq_config": {}, "lora_alpha": alpha, "lora_bias": False, "lora_dropout": 0.0,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
        "r": rank, "rank_pattern": {}, "revision": None, "target_modules": sorted(target_modules),
        "target_parameters": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None,
        "use_dora": False, "use_qalora": False, "use_rslora": use_rslora,
    }


def write_random_adapter(out_dir, config: ModelConfig, rank: int = 8, alpha: float = 16,
                         target_modules: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0,
                         use_rslora: bool = False, layers_to_transform: Optional[Union[int, list[int]]] = None,
                         init_scale: float = 0.02, dtype: str = "float32") -> Path:
    """Write a random PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for ``config``,
    its tensors in ``dtype`` ('float32' | 'bfloat16' | 'float16').

    lora_A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)) as peft's default init; lora_B [out, r] ~ N(0, init_scale)
    (nonzero, unlike peft's init, so the adapter changes the model's outputs). Returns the folder."""
    bad = [m for m in target_modules if m not in MODULES]
    if bad or not target_modules:
        raise AdapterError(f"target_modules must be a non-empty subset of {MODULES}, got {list(target_modules)}")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    layers = range(config.num_layers)
    if layers_to_transform is not None:
        chosen = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
        if any(not 0 <= i < config.num_layers for i in chosen):
            raise AdapterError(f"layers_to_transform {chosen} out of range for {config.num_layers} layers")
        layers = sorted(set(chosen))
    target = numpy_dtype(dtype)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in layers:
        for m in MODULES:
            if m not in target_modules:
                continue
            d_in, d_out = config.module_dims(m)
            block = "self_attn" if m in MODULES[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{block}.{m}"
            bound = 1.0 / math.sqrt(d_in)
            tensors[f"{prefix}.lora_A.weight"] = rng.uniform(-bound, bound, (rank, d_in)).astype(target)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((d_out, rank)) * init_scale).astype(target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _peft_config(config, rank, alpha, target_modules, use_rslora, layers_to_transform)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


__all__ = ["tiny_llama_config", "write_random_checkpoint", "write_random_adapter"]
