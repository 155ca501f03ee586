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
    """The load_params pytree filled on the device: matrices ~ N(0, std), norms = 1.

    ``device``: a Device (default this process's first), or a Sharding, e.g. replicated over a mesh that
    spans several processes: each process then makes the same call and holds its devices' copies (the
    values do not depend on where they are made)."""
    shapes = param_shapes(cfg)
    flat = [(k, s) for k, s in shapes.items() if k != "layers"] + [(("layers", k), s)
                                                                   for k, s in shapes["layers"].items()]
    if isinstance(device, jax.sharding.Sharding):
        sharding = device

        def make(fn):  # no arguments: nothing to place on other processes' devices first
            return jax.jit(fn, out_shardings=sharding)()
    else:
        device = device or jax.local_devices()[0]

        def make(fn):
            with jax.default_device(device):
                return fn()
    out: dict = {"layers": {}}
    for i, (k, shape) in enumerate(flat):
        name = k[1] if isinstance(k, tuple) else k
        if "norm" in name:
            arr = make(lambda: jnp.ones(shape, dtype))
        else:
            # The key is made inside: an array made outside would be an argument placed on one device.
            arr = make(lambda: (jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), shape,
                                                  jnp.float32) * std).astype(dtype))
        if isinstance(k, tuple):
            out["layers"][name] = arr
        else:
            out[name] = arr
    return out
