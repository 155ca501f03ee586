"""A dense, differentiable Llama-family forward with LoRA on any projection, for training adapters.

The serving forward (``slora_jax.model.llama.forward``) reads LoRA weights from the page pool through
index tables and writes a KV cache; neither is differentiable nor needed here. This one takes the base
weights in the engine's fused layout (``llama.fuse_params`` of ``load_params``: wqkv, w_gate_up, [in, out],
stacked over layers; ``engine.runner.params`` as it is) and the LoRA weights as a plain pytree, runs a
right-padded batch with a causal mask, and returns logits, so ``jax.grad`` sees it all.

LoRA pytree (``LoraParams``): ``{module: {"a": [L, r, d_in], "b": [L, r, d_out]}}`` with a = lora_A.weight
and b = lora_B.weight.T, the layout of ``slora_jax.adapters.ModuleLora``; scales ``{module: [L]}`` are kept
apart because they are not trained. A projection computes ``y = x W + scale * (x a^T) b``, as peft does.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from slora_jax.config import ModelConfig
from slora_jax.model.llama import apply_rope, rms_norm, rope_inv_freq

LoraParams = Mapping[str, Mapping[str, jax.Array]]


def _precision(dtype):
    """float32 products at full precision (not TF32 on GPUs), as the serving kernels; others as they are."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _lora_delta(x, lora_l, scales_l, module):
    """scale * (x a^T) b in float32 for one module, or None when the module has no LoRA."""
    if module not in lora_l:
        return None
    a, b = lora_l[module]["a"], lora_l[module]["b"]
    prec = _precision(x.dtype)
    xa = jnp.dot(x, a.T.astype(x.dtype), precision=prec, preferred_element_type=jnp.float32)
    return scales_l[module] * jnp.dot(xa, b.astype(jnp.float32), precision=prec,
                                      preferred_element_type=jnp.float32)


def _fused_proj(x, w, lora_l, scales_l, modules, sizes):
    """x @ w for projections fused along the output axis (float32 accumulation), each plus its LoRA
    term; returns one array per module in x's dtype."""
    y = jnp.dot(x, w, precision=_precision(x.dtype), preferred_element_type=jnp.float32)
    outs, off = [], 0
    for m, n in zip(modules, sizes):
        part = y[..., off:off + n]
        delta = _lora_delta(x, lora_l, scales_l, m)
        outs.append((part if delta is None else part + delta).astype(x.dtype))
        off += n
    return outs


def attention_mask(valid: jax.Array, sliding_window) -> jax.Array:
    """valid [B, T] bool (right-padded rows) -> [B, 1, T, T] bool: causal, real keys, within the window."""
    T = valid.shape[1]
    pos = jnp.arange(T)
    ok = pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        ok &= pos[None, :] > pos[:, None] - sliding_window
    return ok[None, None] & valid[:, None, None, :]


def hidden_states(params: dict, lora: LoraParams, scales: Mapping[str, jax.Array], tokens: jax.Array,
                  valid: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final-norm hidden states [B, T, H] of right-padded token rows.

    params: the fused weights pytree (module docstring), one dtype, its layers stacked or a list of per-layer
    dicts; lora / scales: see the module docstring;
    tokens [B, T] int32; valid [B, T] bool (False on padding, which no real token attends to).
    """
    B, T = tokens.shape
    D, Nq, Nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    H, I = cfg.hidden_size, cfg.intermediate_size
    dtype = params["embed"].dtype
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    positions = jnp.arange(T, dtype=jnp.int32)
    mask = attention_mask(valid, cfg.sliding_window)
    rope = jax.vmap(apply_rope, in_axes=(0, None, None))
    prec = _precision(dtype)
    h = params["embed"][tokens].astype(dtype)

    def layer_fn(h, xs):
        w, lora_l, scales_l = xs
        x = rms_norm(h, w["attn_norm"], cfg.rms_norm_eps)
        q, k, v = _fused_proj(x, w["wqkv"], lora_l, scales_l, ("q_proj", "k_proj", "v_proj"),
                              (cfg.q_size, cfg.kv_size, cfg.kv_size))
        if cfg.attention_bias:
            bq, bk, bv = jnp.split(w["bqkv"], [cfg.q_size, cfg.q_size + cfg.kv_size])
            q, k, v = q + bq, k + bk, v + bv
        q = rope(q.reshape(B, T, Nq, D), positions, inv_freq)
        k = rope(k.reshape(B, T, Nkv, D), positions, inv_freq)
        v = v.reshape(B, T, Nkv, D)
        qg = q.reshape(B, T, Nkv, Nq // Nkv, D)
        s = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=prec, preferred_element_type=jnp.float32) / math.sqrt(D)
        s = jnp.where(mask[:, :, None], s, -jnp.inf)
        # Rows with no key at all (whole padding rows) get uniform weights instead of NaN; never read.
        s = jnp.where(jnp.any(mask, axis=-1, keepdims=True)[:, :, None], s, 0.0)
        p = jax.nn.softmax(s, axis=-1).astype(dtype)
        attn = jnp.einsum("bkgts,bskd->btkgd", p, v, precision=prec, preferred_element_type=jnp.float32).astype(dtype)
        (o,) = _fused_proj(attn.reshape(B, T, Nq * D), w["wo"], lora_l, scales_l, ("o_proj",), (H,))
        h = h + o
        x = rms_norm(h, w["mlp_norm"], cfg.rms_norm_eps)
        g, u = _fused_proj(x, w["w_gate_up"], lora_l, scales_l, ("gate_proj", "up_proj"), (I, I))
        a = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(dtype)
        (d,) = _fused_proj(a, w["w_down"], lora_l, scales_l, ("down_proj",), (H,))
        return h + d, None

    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        # Unrolled (an engine built with scan_layers=False): each layer's weights are used where they lie.
        for l, w in enumerate(layers):
            lora_l = jax.tree.map(lambda a: a[l], dict(lora))
            scales_l = jax.tree.map(lambda a: a[l], dict(scales))
            h, _ = layer_fn(h, (w, lora_l, scales_l))
    else:
        h, _ = jax.lax.scan(layer_fn, h, (layers, dict(lora), dict(scales)))
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps)


def causal_lm_logits(params: dict, lora: LoraParams, scales: Mapping[str, jax.Array], tokens: jax.Array,
                     valid: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Float32 logits [B, T, V] of every position (arguments as :func:`hidden_states`)."""
    h = hidden_states(params, lora, scales, tokens, valid, cfg)
    head = params["embed"].T if params.get("lm_head") is None else params["lm_head"]  # tied embeddings
    return jnp.einsum("bth,hv->btv", h, head, precision=_precision(h.dtype), preferred_element_type=jnp.float32)


def next_token_loss(params: dict, lora: LoraParams, scales: Mapping[str, jax.Array], tokens: jax.Array,
                    valid: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Mean cross-entropy (nats) of predicting tokens[:, 1:] from their prefixes, over real tokens only."""
    logits = causal_lm_logits(params, lora, scales, tokens, valid, cfg)[:, :-1]
    targets = tokens[:, 1:]
    weight = (valid[:, 1:] & valid[:, :-1]).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)
