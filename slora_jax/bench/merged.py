"""The "one adapter merged into the weights" baseline: W' = W + s * A^T B in every adapted projection.

Serving a merged adapter costs exactly the base model's compute; the merged weights are swapped into a
running engine (same shapes, so no program is recompiled) and the originals are put back afterwards.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.config import ModelConfig
from slora_jax.errors import AdapterError

# Fused weight of each projection (see model.llama.fuse_params) and the projections it concatenates.
_FUSED = {"wqkv": ("q_proj", "k_proj", "v_proj"), "wo": ("o_proj",), "w_gate_up": ("gate_proj", "up_proj"),
          "w_down": ("down_proj",)}


@functools.partial(jax.jit, static_argnames=("col",))
def _merge_columns(w, a, b, s, *, col: int):
    """w [L, d_in, N] with s[l] * a[l]^T b[l] added to columns [col, col + d_out); one layer at a time
    (a [L, r, d_in], b [L, r, d_out], s [L]) so the float32 temporary is one layer's."""
    L, d_in, _ = w.shape
    d_out = b.shape[-1]

    def body(l, w):
        d = jnp.dot(a[l].T, b[l], preferred_element_type=jnp.float32) * s[l]
        blk = jax.lax.dynamic_slice(w, (l, 0, col), (1, d_in, d_out))
        return jax.lax.dynamic_update_slice(w, (blk.astype(jnp.float32) + d[None]).astype(w.dtype), (l, 0, col))

    return jax.lax.fori_loop(0, L, body, w)


@functools.partial(jax.jit, static_argnames=("col",))
def _merge_layer(w, a, b, s, *, col: int):
    """One layer's w [d_in, N] with s * a^T b added to columns [col, col + d_out)."""
    d = jnp.dot(a.T, b, preferred_element_type=jnp.float32) * s
    blk = jax.lax.dynamic_slice(w, (0, col), (w.shape[0], b.shape[-1]))
    return jax.lax.dynamic_update_slice(w, (blk.astype(jnp.float32) + d).astype(w.dtype), (0, col))


def merge_lora(fused_params: dict, cfg: ModelConfig, lora) -> dict:
    """A copy of the engine's (fused) params with ``lora`` (LoraWeights) merged; untouched arrays are shared.
    Works on both layouts: stacked layers (``layers`` a dict of [L, ...] arrays) and unrolled (a list)."""
    layers = fused_params["layers"]
    stacked = isinstance(layers, dict)
    if not stacked and not isinstance(layers, (list, tuple)):
        raise AdapterError(f"cannot merge into parameters whose layers are a {type(layers).__name__}")
    out_layers = dict(layers) if stacked else [dict(layer) for layer in layers]
    for key, mods in _FUSED.items():
        col = 0
        for m in mods:
            d_out = cfg.module_dims(m)[1]
            ml = lora.modules.get(m)
            if ml is not None:
                a = jnp.asarray(ml.a, jnp.float32)
                b = jnp.asarray(ml.b, jnp.float32)
                s = jnp.asarray(ml.scales, jnp.float32)
                if stacked:
                    out_layers[key] = _merge_columns(out_layers[key], a, b, s, col=col)
                else:
                    for i, layer in enumerate(out_layers):
                        layer[key] = _merge_layer(layer[key], a[i], b[i], s[i], col=col)
            col += d_out
    out = dict(fused_params)
    out["layers"] = out_layers
    return out


def merged_reference(w: np.ndarray, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """numpy: w [L, d_in, d_out] + s[l] * a[l]^T @ b[l] (the definition, for tests)."""
    return w + np.einsum("lri,lro->lio", a, b) * s[:, None, None]


@contextlib.contextmanager
def merged_into(engine, lora):
    """Serve ``engine`` with ``lora`` merged into its weights inside the block (requests use adapter=None)."""
    original = engine.base_params()
    merged = merge_lora(original, engine.model_config, lora)
    jax.block_until_ready(merged)
    engine.replace_base_params(merged)
    try:
        yield engine
    finally:
        engine.replace_base_params(original)
