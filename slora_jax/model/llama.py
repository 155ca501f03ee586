"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) as one jitted program over all layers.

Weights are a plain pytree (see ``checkpoint.load_params``), layer tensors stacked on axis 0 and scanned.
The KV cache and the LoRA weights both live in the unified page pool ``[L, P, R, W]``; every projection
adds its LoRA term through the gather-matmul ops of ``pallas_kernels`` reading that pool through index
tables, so a batch mixes any adapters and ranks, and rows without an adapter get exactly the base output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from slora_jax.config import MODULES, ModelConfig

# Projections that share an input are handled by one fused LoRA call (x read once), in MODULES order.
LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {m: (g, i) for g, ms in LORA_GROUPS.items() for i, m in enumerate(ms)}
assert set(MODULE_GROUP) == set(MODULES)


def group_dims(cfg: ModelConfig, group: str) -> tuple[int, tuple[int, ...]]:
    """(d_in, out_sizes) of a LoRA group."""
    mods = LORA_GROUPS[group]
    return cfg.module_dims(mods[0])[0], tuple(cfg.module_dims(m)[1] for m in mods)


# ------------------------------------------------------------------------------------------ rope
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2] with HF's "linear" and "llama3" scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    if rs["type"] == "linear":
        return (inv / rs["factor"]).astype(np.float32)
    if rs["type"] == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        low_wl, high_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = np.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = ~(wl < high_wl) & ~(wl > low_wl)
        return np.where(is_mid, mid, scaled).astype(np.float32)
    raise ValueError(f"unknown rope type {rs['type']!r}")  # config parsing refuses it earlier


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [T, N, D] rotated by position (HF's rotate-half convention); math in float32."""
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, axis=-1)[:, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rot * sin).astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


# ------------------------------------------------------------------------------------ weights
def fuse_params(params: dict, cfg: ModelConfig) -> dict:
    """Concatenate q/k/v and gate/up weights so each group is one matmul (numpy stays on the host)."""
    lay = dict(params["layers"])
    xp = jnp if isinstance(lay["wq"], jax.Array) else np
    lay["wqkv"] = xp.concatenate([lay.pop("wq"), lay.pop("wk"), lay.pop("wv")], axis=-1)
    if cfg.attention_bias:
        lay["bqkv"] = xp.concatenate([lay.pop("bq"), lay.pop("bk"), lay.pop("bv")], axis=-1)
    lay["w_gate_up"] = xp.concatenate([lay.pop("w_gate"), lay.pop("w_up")], axis=-1)
    out = dict(params)
    out["layers"] = lay
    return out


# Logical axes of the fused weights, per layer (a stacked layer axis, when present, comes first and is
# never split); sharding/ maps them to mesh axes. The fused q|k|v and gate|up columns are split as one
# axis, so under tensor parallelism XLA's partitioner inserts the collectives that re-split them.
PARAM_AXES: dict[str, tuple] = {
    "embed": (None, None), "final_norm": (None,), "lm_head": (None, "vocab"),
    "attn_norm": (None,), "mlp_norm": (None,),
    "wqkv": (None, "heads"), "bqkv": ("heads",), "wo": ("heads", None),
    "w_gate_up": (None, "mlp"), "w_down": ("mlp", None),
}
POOL_AXES = (None, None, None, "kv_width")  # [L, P, R, W]: W holds the K/V heads


def param_axes(path, leaf) -> tuple:
    """Logical axes of one leaf of the fused params pytree (for sharding.tree_shardings)."""
    name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    axes = PARAM_AXES[name]
    return (None,) + axes if leaf.ndim == len(axes) + 1 else axes


# ------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class StepStatics:
    """Static (compile-time) facts of a step program."""

    mode: str  # "decode" | "mixed" | "prefill" (scoring: self-attention within the step, no cache)
    backend: Optional[str]  # kernel implementation: "xla" | "pallas" | None (auto)
    all_logits: bool = False  # prefill: return logits of every token (scoring) instead of sampling
    greedy_only: bool = False  # every row of the batch is greedy: no vocabulary sort
    # LoRA groups whose kernels the program runs (an adapter of the batch targets them); () = none.
    lora_groups: tuple = tuple(LORA_GROUPS)


def _linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w in the weights' dtype, accumulated in float32. Asking the GEMM for the narrow output (rather
    than float32 and a cast after it) lets cuBLAS round in its epilogue: the separate casts of float32
    [T, N] outputs took ~7% of the device time of a Llama-3-8B serving run on the H200."""
    if w.dtype == jnp.float32:
        return _dot(x, w)
    return jnp.dot(x, w, preferred_element_type=w.dtype)


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w accumulated in float32; float32 weights get full precision (GPUs default to TF32, which
    misses the float32 parity with transformers by ~3e-4)."""
    prec = jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None
    return jnp.dot(x, w, precision=prec, preferred_element_type=jnp.float32)


def _lora(y, x, pool, layer, tables, inp, group, out_sizes, st: StepStatics):
    """y + each token's LoRA delta of ``group``: MBGMV for decode tokens, MBGMM for prompt tokens (a mixed
    step's decode tokens are its first ``slot_decode.shape[0]`` tokens at most)."""
    if group not in st.lora_groups:
        return y
    a_pages, b_pages, ranks, scales = tables[group]
    args = (pool, layer, a_pages, b_pages, ranks, scales)
    if st.mode == "decode":
        return pk.lora_decode(y, x, *args, inp["token_slot"], out_sizes=out_sizes, implementation=st.backend)
    if st.mode == "prefill":
        return pk.lora_prefill(y, x, *args, inp["token_slot"], out_sizes=out_sizes, implementation=st.backend)
    n = inp["slot_decode"].shape[0]
    head = pk.lora_decode(y[:n], x[:n], *args, inp["slot_decode"], out_sizes=out_sizes, implementation=st.backend)
    y = jax.lax.dynamic_update_slice_in_dim(y, head, 0, axis=0)
    # The engine lays prompt chunks out sorted by adapter: each slot's tokens are one run.
    return pk.lora_prefill(y, x, *args, inp["slot_prefill"], out_sizes=out_sizes, implementation=st.backend,
                           slots_in_runs=True)


def forward(params: dict, pool: jax.Array, tables: dict, inp: dict, cfg: ModelConfig, st: StepStatics):
    """Run all layers over the step's tokens; returns (final hidden states [T, H], updated pool).

    inp (all arrays, shapes bucketed by the engine):
      tokens [T], positions [T], k_rows/v_rows [T] (flat pool rows page*R+i where this token's K/V go;
      -1 = do not store);
      decode (T = B, one token per request): token_slot [T] (-1 = base model), k_pages/v_pages [B, NB],
        lengths [B] (tokens in cache after this step's write);
      mixed (decode tokens first, then prompt chunks; N = min(T, rows) rows of page tables): k_pages/v_pages
        [N, NB] (decode token i is row i), lengths [N] (decode attention; 0 = not a decode token),
        token_row [T] (prompt tokens: their row; -1 otherwise), slot_decode [N] / slot_prefill [T] (adapter
        slot of the decode / prompt tokens, -1 elsewhere);
      prefill (scoring, nothing cached): token_slot [T], segment_ids [T] (-1 = padding).
    """
    D = cfg.head_dim
    Nq, Nkv = cfg.num_heads, cfg.num_kv_heads
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    sm_scale = 1.0 / math.sqrt(D)
    lay = params["layers"]
    dtype = params["embed"].dtype
    h = params["embed"][inp["tokens"]].astype(dtype)
    T = h.shape[0]
    pos = inp["positions"]
    qkv_out = group_dims(cfg, "qkv")[1]
    o_out = group_dims(cfg, "o")[1]
    gu_out = group_dims(cfg, "gate_up")[1]
    dn_out = group_dims(cfg, "down")[1]

    def layer_fn(carry, xs):
        h, pool = carry
        w, l = xs
        x = rms_norm(h, w["attn_norm"], cfg.rms_norm_eps)
        qkv = _linear(x, w["wqkv"])
        if cfg.attention_bias:
            qkv = qkv + w["bqkv"]
        qkv = _lora(qkv, x, pool, l, tables, inp, "qkv", qkv_out, st)
        q = qkv[:, :Nq * D].reshape(T, Nq, D)
        k = qkv[:, Nq * D:(Nq + Nkv) * D].reshape(T, Nkv, D)
        v = qkv[:, (Nq + Nkv) * D:].reshape(T, Nkv, D)
        q = apply_rope(q, pos, inv_freq)
        k = apply_rope(k, pos, inv_freq)
        pool = pk.write_kv(pool, l, k.reshape(T, Nkv * D), v.reshape(T, Nkv * D), inp["k_rows"], inp["v_rows"],
                           implementation=st.backend)
        window = cfg.sliding_window
        if st.mode == "prefill":
            attn = pk.prefill_attention(q, k, v, inp["segment_ids"], pos, sm_scale=sm_scale,
                                        sliding_window=window, implementation=st.backend)
        elif st.mode == "decode":
            attn = pk.paged_decode_attention(q, pool, l, inp["k_pages"], inp["v_pages"], inp["lengths"],
                                             sm_scale=sm_scale, sliding_window=window, implementation=st.backend)
        else:
            # Each kernel gives exact zeros for the tokens the other one attends: the sum is either's output.
            attn = pk.paged_prefill_attention(q, pool, l, inp["token_row"], pos, inp["k_pages"], inp["v_pages"],
                                              sm_scale=sm_scale, sliding_window=window, implementation=st.backend)
            n = inp["lengths"].shape[0]
            head = pk.paged_decode_attention(q[:n], pool, l, inp["k_pages"], inp["v_pages"], inp["lengths"],
                                             sm_scale=sm_scale, sliding_window=window, implementation=st.backend)
            attn = jax.lax.dynamic_update_slice_in_dim(attn, attn[:n] + head, 0, axis=0)
        attn = attn.reshape(T, Nq * D)
        o = _linear(attn, w["wo"])
        o = _lora(o, attn, pool, l, tables, inp, "o", o_out, st)
        h = h + o
        x = rms_norm(h, w["mlp_norm"], cfg.rms_norm_eps)
        gu = _linear(x, w["w_gate_up"])
        gu = _lora(gu, x, pool, l, tables, inp, "gate_up", gu_out, st)
        I = cfg.intermediate_size
        a = (jax.nn.silu(gu[:, :I].astype(jnp.float32)) * gu[:, I:].astype(jnp.float32)).astype(dtype)
        d = _linear(a, w["w_down"])
        d = _lora(d, a, pool, l, tables, inp, "down", dn_out, st)
        h = h + d
        return (h, pool), None

    if isinstance(lay, (list, tuple)):
        # Unrolled: per-layer arrays, static layer index (no per-step slicing of stacked weights).
        for l, w in enumerate(lay):
            (h, pool), _ = layer_fn((h, pool), (w, jnp.int32(l)))
    else:
        layers_idx = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (h, pool), _ = jax.lax.scan(layer_fn, (h, pool), (lay, layers_idx))
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    return h, pool


def lm_logits(params: dict, h: jax.Array) -> jax.Array:
    """h [N, H] -> float32 logits [N, V] (tied embeddings when there is no lm_head)."""
    w = params.get("lm_head")
    return _dot(h, params["embed"].T if w is None else w)
