"""Random LoRA adapters in memory, for benchmarks with hundreds of adapters at real model shapes."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from slora_jax.adapters.peft import LoraWeights, ModuleLora
from slora_jax.config import MODULES, ModelConfig


def random_lora(cfg: ModelConfig, rank: int, targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                alpha: float | None = None, seed: int = 0, name: str = "random", std: float = 0.02) -> LoraWeights:
    """A LoraWeights with A ~ U(+-1/sqrt(d_in)) (peft's init) and B ~ N(0, std) in every layer."""
    rng = np.random.default_rng(seed)
    alpha = float(rank if alpha is None else alpha)
    L = cfg.num_layers
    modules = {}
    for m in MODULES:
        if m not in targets:
            continue
        d_in, d_out = cfg.module_dims(m)
        bound = 1.0 / math.sqrt(d_in)
        a = rng.uniform(-bound, bound, (L, rank, d_in)).astype(np.float32)
        b = (rng.standard_normal((L, rank, d_out), dtype=np.float32) * std).astype(np.float32)
        modules[m] = ModuleLora(a=a, b=b, ranks=np.full(L, rank, np.int32),
                                scales=np.full(L, alpha / rank, np.float32))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(modules)}
    return LoraWeights(name=name, path="", modules=modules, rank=rank, target_modules=tuple(modules), config=config)
