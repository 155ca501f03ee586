"""Random weights made directly on the device, for benchmarks at real model shapes (e.g. Llama-2-7B)
without writing or reading gigabytes of safetensors."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slora_jax.config import ModelConfig
from slora_jax.model.checkpoint import param_shapes

NAMED_SHAPES = {
    "llama-2-7b": dict(architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,), name="llama-2-7b"),
    "llama-2-13b": dict(architecture="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128, rms_norm_eps=1e-5,
                        max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,), name="llama-2-13b"),
    "llama-3-8b": dict(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000,
                       eos_token_ids=(128001,), name="llama-3-8b"),
    "llama-3-70b": dict(architecture="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                        rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000,
                        eos_token_ids=(128001,), name="llama-3-70b"),
}


def named_config(name: str, **overrides) -> ModelConfig:
    """A built-in model shape by name (see NAMED_SHAPES)."""
    from slora_jax.errors import ModelError

    if name not in NAMED_SHAPES:
        raise ModelError(f"unknown model shape {name!r} (known: {', '.join(NAMED_SHAPES)})")
    return ModelConfig(**{**NAMED_SHAPES[name], **overrides})


def random_params(cfg: ModelConfig, dtype=jnp.bfloat16, seed: int = 0, std: float = 0.02, device=None) -> dict:
    """The load_params pytree filled on the device: matrices ~ N(0, std), norms = 1."""
    device = device or jax.devices()[0]
    shapes = param_shapes(cfg)
    key = jax.random.PRNGKey(seed)
    flat = [(k, s) for k, s in shapes.items() if k != "layers"] + [(("layers", k), s)
                                                                   for k, s in shapes["layers"].items()]
    out: dict = {"layers": {}}
    for i, (k, shape) in enumerate(flat):
        name = k[1] if isinstance(k, tuple) else k
        with jax.default_device(device):
            if "norm" in name:
                arr = jnp.ones(shape, dtype)
            else:
                arr = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * std).astype(dtype)
        if isinstance(k, tuple):
            out["layers"][name] = arr
        else:
            out[name] = arr
    return out
