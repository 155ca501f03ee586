"""Write a LoRA in PEFT's on-disk format: adapter_config.json + adapter_model.safetensors.

The folder is what ``PeftModel.save_pretrained`` writes for a Llama-family ``*ForCausalLM``: tensors
``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight`` [r, d_in] and ``.lora_B.weight``
[d_out, r] in float32 with metadata ``{"format": "pt"}``, and the config fields peft saves. Per-layer ranks
and scales that differ from the common one go to ``rank_pattern`` / ``alpha_pattern`` keyed by full module
names, and a module adapted in only some layers is listed by full names in ``target_modules``, so both peft
and :func:`slora_jax.adapters.load_peft_adapter` rebuild exactly the same adapter.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from safetensors.numpy import save_file

from slora_jax.adapters.peft import CONFIG_FILE, WEIGHTS_FILE, LoraWeights, module_key
from slora_jax.config import MODULES
from slora_jax.errors import AdapterError

# The peft release whose save_pretrained output this mirrors (field set and order).
PEFT_FORMAT_VERSION = "0.21.2"


def peft_lora_config(rank: int, alpha: float, target_modules: Sequence[str], use_rslora: bool = False,
                     base_model_name: Optional[str] = None, rank_pattern: Optional[dict] = None,
                     alpha_pattern: Optional[dict] = None) -> dict:
    """adapter_config.json of a plain LoRA on a causal LM, with every field peft's LoraConfig saves."""
    return {
        "alora_invocation_tokens": None, "alpha_pattern": dict(alpha_pattern or {}), "arrow_config": None,
        "auto_mapping": None, "base_model_name_or_path": base_model_name, "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
        "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
        "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16, "r": rank,
        "rank_pattern": dict(rank_pattern or {}), "revision": None, "target_modules": list(target_modules),
        "target_parameters": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None,
        "use_dora": False, "use_qalora": False, "use_rslora": bool(use_rslora), "velora_config": None,
    }


def _clean_alpha(alpha: float):
    """alpha recovered from a float32 scale, as the int it almost surely was when it is one."""
    r = round(alpha)
    if abs(alpha - r) <= 1e-5 * max(1.0, abs(alpha)):
        return int(r)
    return float(f"{alpha:.7g}")  # drop float32 noise so equal alphas compare equal


def _most_common(values: list):
    return Counter(values).most_common(1)[0][0]


def _check(lora: LoraWeights) -> None:
    if not isinstance(lora, LoraWeights):
        raise AdapterError(f"expected a LoraWeights, got {type(lora).__name__}")
    if not lora.modules:
        raise AdapterError(f"adapter {lora.name!r} has no modules to save")
    for m, ml in lora.modules.items():
        if m not in MODULES:
            raise AdapterError(f"adapter {lora.name!r} has LoRA on {m!r}; only {', '.join(MODULES)} are supported")
        L = ml.ranks.shape[0]
        if ml.a.ndim != 3 or ml.b.ndim != 3 or ml.a.shape[:2] != ml.b.shape[:2] or ml.a.shape[0] != L \
                or ml.scales.shape != (L,):
            raise AdapterError(f"{m}: inconsistent shapes a {ml.a.shape}, b {ml.b.shape}, ranks {ml.ranks.shape}, "
                               f"scales {ml.scales.shape} (expected a [L, R, d_in], b [L, R, d_out], [L], [L])")
        if np.any(ml.ranks < 0) or np.any(ml.ranks > ml.a.shape[1]):
            raise AdapterError(f"{m}: ranks {ml.ranks.tolist()} outside [0, {ml.a.shape[1]}]")
        if not (np.isfinite(ml.a).all() and np.isfinite(ml.b).all() and np.isfinite(ml.scales).all()):
            raise AdapterError(f"{m}: non-finite LoRA weights or scales (NaN or Inf)")


def save_peft_adapter(lora: LoraWeights, out_dir, base_model_name: Optional[str] = None) -> Path:
    """Write ``lora`` as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors); returns it.

    lora: per module a [L, R, d_in] (lora_A.weight rows), b [L, R, d_out] (lora_B.weight.T), ranks [L]
    (0 = layer not adapted), scales [L]; ``lora.config["use_rslora"]`` says whether scale = alpha/sqrt(r).
    base_model_name goes to ``base_model_name_or_path`` (the model's hub id or folder). Loadable with
    ``PeftModel.from_pretrained`` and ``Engine.load_adapter``. Raises AdapterError on inconsistent weights.
    """
    _check(lora)
    use_rslora = bool((lora.config or {}).get("use_rslora", False))
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    adapted: dict[str, list[int]] = {}
    num_layers = next(iter(lora.modules.values())).ranks.shape[0]
    for m in MODULES:
        ml = lora.modules.get(m)
        if ml is None:
            continue
        for layer in range(ml.ranks.shape[0]):
            r = int(ml.ranks[layer])
            if r == 0:
                continue
            key = module_key(layer, m)
            prefix = f"base_model.model.{key}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(ml.a[layer, :r], dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(ml.b[layer, :r].T, dtype=np.float32)
            ranks[key] = r
            alphas[key] = _clean_alpha(float(ml.scales[layer]) * (math.sqrt(r) if use_rslora else r))
            adapted.setdefault(m, []).append(layer)
    if not tensors:
        raise AdapterError(f"adapter {lora.name!r} has rank 0 in every layer: nothing to save")

    rank = _most_common(list(ranks.values()))
    alpha = _most_common(list(alphas.values()))
    rank_pattern = {k: r for k, r in ranks.items() if r != rank}
    alpha_pattern = {k: a for k, a in alphas.items() if a != alpha}
    if all(len(layers) == num_layers for layers in adapted.values()):
        targets = sorted(adapted)
    else:  # some layers skipped: name every adapted module exactly
        targets = sorted(ranks)
    config = peft_lora_config(rank, alpha, targets, use_rslora, base_model_name, rank_pattern, alpha_pattern)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
