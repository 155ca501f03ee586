"""Session fixtures: tiny Hugging Face checkpoints and PEFT adapters made with transformers + peft + torch.

Everything is float32 and saved with ``save_pretrained(..., safe_serialization=True)``, so these folders are
exactly what users hand the engine. Weights are drawn larger than transformers' default init (std 0.02),
and LoRA B is random (peft starts it at zero), so adapters change greedy tokens.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Lets test modules `import hf_reference` whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHT_STD = 0.15  # of linear and embedding weights
NORM_STD = 0.1  # norms are 1 + N(0, NORM_STD): exercises the norm weights
LORA_B_STD = 0.1

LLAMA_GQA = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    rope_theta=10000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64},
)
QWEN2 = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, bos_token_id=None, eos_token_id=[3, 4],
)

# name -> LoraConfig kwargs. Together they cover every option the loader implements.
LLAMA_ADAPTERS = {
    "qv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "rslora_all_r16": dict(r=16, lora_alpha=32, target_modules="all-linear", use_rslora=True),
    # A pattern must match a whole trailing name: "gate" matches nothing.
    "patterns": dict(r=4, lora_alpha=8, target_modules=PROJECTIONS,
                     rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2},
                     alpha_pattern={"v_proj": 32, "layers.0.self_attn.o_proj": 3, "gate": 50}),
    "mlp_layer1": dict(r=8, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                       layers_to_transform=[1]),
    "regex": dict(r=6, lora_alpha=12, target_modules=r".*\.layers\.0\.self_attn\.(q|k|o)_proj|.*\.mlp\.up_proj"),
    "k_r1": dict(r=1, lora_alpha=2, target_modules=["k_proj"]),
}
QWEN2_ADAPTERS = {
    "qkv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]),
    "all_r4": dict(r=4, lora_alpha=4, target_modules="all-linear"),
}


def _randomise(model, seed: int) -> None:
    """Redraw every base weight (biases included, Qwen2's are zero at init) in place."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * noise)
            else:
                p.copy_(WEIGHT_STD * noise)


def build_model(out_dir: Path, arch: str, seed: int, **overrides) -> Path:
    """Save a random tiny ``arch`` ('llama' | 'qwen2') model with transformers; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_GQA, **overrides}))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**{**QWEN2, **overrides}))
    _randomise(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def build_adapter(base_dir: Path, out_dir: Path, seed: int, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for ``base_dir`` with random A and B; returns the folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(LORA_B_STD * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


@pytest.fixture(scope="session")
def llama_gqa_dir(tmp_path_factory) -> Path:
    """LlamaForCausalLM: vocab 128, hidden 64, 2 layers, 4 heads / 2 kv heads, intermediate 128, llama3 rope."""
    return build_model(tmp_path_factory.mktemp("llama_gqa"), "llama", seed=0)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    """Qwen2ForCausalLM: nonzero q/k/v biases, tied embeddings, eos [3, 4]."""
    return build_model(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=1)


@pytest.fixture(scope="session")
def llama_adapters(tmp_path_factory, llama_gqa_dir) -> dict[str, Path]:
    """name -> PEFT adapter folder on llama_gqa_dir; names and options in LLAMA_ADAPTERS."""
    root = tmp_path_factory.mktemp("llama_adapters")
    return {name: build_adapter(llama_gqa_dir, root / name, seed=100 + i, **kw)
            for i, (name, kw) in enumerate(LLAMA_ADAPTERS.items())}


@pytest.fixture(scope="session")
def qwen2_adapters(tmp_path_factory, qwen2_dir) -> dict[str, Path]:
    """name -> PEFT adapter folder on qwen2_dir; names and options in QWEN2_ADAPTERS."""
    root = tmp_path_factory.mktemp("qwen2_adapters")
    return {name: build_adapter(qwen2_dir, root / name, seed=200 + i, **kw)
            for i, (name, kw) in enumerate(QWEN2_ADAPTERS.items())}
