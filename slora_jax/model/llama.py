"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) as flax.nnx Modules: Llama > DecoderLayer >
Attention, MLP.

Every weight is an ``nnx.Param`` whose metadata names its logical axes (``out_sharding``); the rules table in
``sharding/`` maps them to mesh axes. Whether the layers are scanned (one DecoderLayer holding weights
stacked on a leading "layers" axis) or unrolled (a list of DecoderLayers) is the ``scan_layers`` property of
the model. The engine's step program takes the model's split state (``nnx.split``) and merges it inside
the jit, as flax's gemma sampler does.

The KV cache and the LoRA weights both live in the unified page pool ``[L, P, R, W]``; every projection
adds its LoRA term through the gather-matmul ops of ``pallas_kernels`` reading that pool through index
tables, so a batch mixes any adapters and ranks, and rows without an adapter get exactly the base output.
For training, ``attach_lora`` gives the projections dense LoRA weights instead (the differentiable form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels as pk
from sharding import TensorParallelLayout, all_reduce
from slora_jax.config import MODULES, ModelConfig
from slora_jax.errors import ModelError

# Projections that share an input are handled by one fused LoRA call (x read once), in MODULES order.
LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {m: (g, i) for g, ms in LORA_GROUPS.items() for i, m in enumerate(ms)}
assert set(MODULE_GROUP) == set(MODULES)
# A word of StepStatics.lora_groups beside the group names, not a group: the decode step's tokens share few
# adapters, and MBGMV runs its tile kernels (pallas_kernels.lora_decode grouping "tiles").
LORA_TILES = "tiles"
# Another word: every adapter of the step has rank <= page_rows in every module, so the LoRA page tables are cut
# to their first rank block for the step. The kernels are then compiled for one rank block, not the pool's
# max_lora_rank / page_rows (registers for 1 block, no programs for blocks no adapter uses): on the H200, 256
# tokens on 256 rank-16 adapters took 50.1-50.3 us per q/k/v call against 54.3-54.4 in a rank-64 pool, 8
# tokens on one adapter 5.8 against 7.4 (benchmarks/NOTES.md, "One rank block").
LORA_ONE_BLOCK = "one_rank_block"


def group_dims(cfg: ModelConfig, group: str, tp: int = 1) -> tuple[int, tuple[int, ...]]:
    """(d_in, out_sizes) of a LoRA group; on one of ``tp`` tensor-parallel devices, its local sizes."""
    mods = LORA_GROUPS[group]
    dims = cfg.module_dims if tp == 1 else TensorParallelLayout(cfg, tp).local_dims
    return dims(mods[0])[0], tuple(dims(m)[1] for m in mods)


def _local_heads(cfg: ModelConfig, tp: int) -> tuple[int, int, int]:
    """(q heads, KV heads, intermediate size) of one of ``tp`` tensor-parallel devices."""
    if tp == 1:
        return cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    lay = TensorParallelLayout(cfg, tp)
    return lay.q_heads, lay.kv_heads, lay.intermediate


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


def rope_tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [T, 1, D] of each token's position, in float32: made once per step and shared by every
    layer's q and k (made per layer, they were a third of an unrolled step program's tracing time)."""
    ang = positions.astype(jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(cfg))[None, :]  # [T, D/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, axis=-1)[:, None, :]
    return cos, sin


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """x [T, N, D] rotated by position (HF's rotate-half convention; ``rope`` from rope_tables); math in
    float32."""
    cos, sin = rope
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


# ------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class StepStatics:
    """Static (compile-time) facts of a step program."""

    mode: str  # "decode" | "mixed" | "prefill" (scoring: self-attention within the step, no cache)
    backend: Optional[str]  # kernel implementation: "xla" | "pallas" | None (auto)
    all_logits: bool = False  # prefill: return logits of every token (scoring) instead of sampling
    greedy_only: bool = False  # every row of the batch is greedy: no vocabulary sort
    # LoRA groups whose kernels the program runs (an adapter of the batch targets them); () = none. With
    # LORA_TILES among them, the decode tokens run MBGMV's tile kernels on one plan per step; with LORA_ONE_BLOCK,
    # the LoRA tables are cut to one rank block.
    lora_groups: tuple = tuple(LORA_GROUPS)
    # Devices the decoder is split over (sharding.tensor_parallel): the layers run inside shard_decoder on
    # each device's heads and MLP columns, and all-reduce after the o and down projections.
    tp: int = 1


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


def lora_tiles(st: StepStatics) -> bool:
    """Whether the step's decode tokens run MBGMV's tile kernels (a decode step the host found many tokens per
    adapter in: `pallas_kernels.lora_decode_grouping`)."""
    return st.mode == "decode" and LORA_TILES in st.lora_groups


def _lora(y, x, pool, layer, tables, inp, group, out_sizes, st: StepStatics):
    """y + each token's LoRA delta of ``group``: MBGMV for decode tokens, MBGMM for prompt tokens (a mixed
    step's decode tokens are its first ``slot_decode.shape[0]`` tokens at most)."""
    if group not in st.lora_groups or tables is None:
        return y
    a_pages, b_pages, ranks, scales = tables[group]
    args = (pool, layer, a_pages, b_pages, ranks, scales)
    if st.mode == "decode":
        tiles = dict(grouping="tiles", plan=inp["lora_plan"]) if lora_tiles(st) else {}
        return pk.lora_decode(y, x, *args, inp["token_slot"], out_sizes=out_sizes, implementation=st.backend, **tiles)
    if st.mode == "prefill":
        return pk.lora_prefill(y, x, *args, inp["token_slot"], out_sizes=out_sizes, implementation=st.backend)
    n = inp["slot_decode"].shape[0]
    head = pk.lora_decode(y[:n], x[:n], *args, inp["slot_decode"], out_sizes=out_sizes, implementation=st.backend)
    y = jax.lax.dynamic_update_slice_in_dim(y, head, 0, axis=0)
    # The engine lays prompt chunks out sorted by adapter: each slot's tokens are one run.
    return pk.lora_prefill(y, x, *args, inp["slot_prefill"], out_sizes=out_sizes, implementation=st.backend,
                           slots_in_runs=True, tiles=inp["lora_prefill_tiles"])


# ------------------------------------------------------------------------------------ modules
# Logical axes of each weight (without the leading "layers" axis of scanned layers); sharding/'s rules map
# them to mesh axes. The fused q|k|v and gate|up columns are one axis each.
PARAM_AXES: dict[str, tuple] = {
    "embed": ("vocab_rows", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab"),
    "attn_norm": ("embed",), "mlp_norm": ("embed",),
    "wqkv": ("embed", "heads"), "bqkv": ("heads",), "wo": ("heads", "embed"),
    "w_gate_up": ("embed", "mlp"), "w_down": ("mlp", "embed"),
}
LAYERS_AXIS = "layers"  # leading axis of stacked (scanned) layer weights
POOL_AXES = (None, None, None, "kv_width")  # [L, P, R, W]: W holds the K/V heads


def _param(shape, dtype, name: str, stacked: Optional[int]) -> nnx.Param:
    """A weight of ``shape`` (zeros until a checkpoint fills it) named with its logical axes. Placement is
    the caller's (sharding/ rules), so flax's eager sharding is off."""
    axes = PARAM_AXES[name]
    if stacked is not None:
        shape, axes = (stacked,) + tuple(shape), (LAYERS_AXIS,) + axes
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=axes, eager_sharding=False)


def param_axes(var: nnx.Variable) -> tuple:
    """The logical axes a model weight was created with (see PARAM_AXES)."""
    return tuple(var.get_metadata()["out_sharding"])


def _replace(var: nnx.Variable, value) -> None:
    """Swap a weight's whole value (same shape), so a new placement or dtype is kept as given."""
    if tuple(value.shape) != tuple(var.shape):
        raise ModelError(f"weight of shape {tuple(value.shape)} given where the model has {tuple(var.shape)}")
    var.set_value(value)


class LoRA(nnx.Module):
    """A dense low-rank update of one projection, for training: delta = scale * (x a^T) b, as peft computes
    it (a = lora_A.weight [r, d_in], b = lora_B.weight^T [r, d_out]). Serving reads adapters from the page
    pool instead; this is the differentiable form. a and b are ``nnx.LoRAParam``s (what training updates);
    the scale is not trained. Stacked layers hold a leading layer axis on all three."""

    def __init__(self, a, b, scale):
        self.a = nnx.LoRAParam(a)
        self.b = nnx.LoRAParam(b)
        self.scale = nnx.Variable(scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [T, d_in] -> float32 delta [T, d_out]."""
        prec = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
        xa = jnp.dot(x, self.a[...].T.astype(x.dtype), precision=prec, preferred_element_type=jnp.float32)
        return self.scale[...] * jnp.dot(xa, self.b[...].astype(jnp.float32), precision=prec,
                                         preferred_element_type=jnp.float32)


def _dense_lora(y, x, loras, group, out_sizes):
    """y plus the dense LoRA deltas of the group's projections that have one (their output columns)."""
    if not loras:
        return y
    parts, off = [], 0
    for m, n in zip(LORA_GROUPS[group], out_sizes):
        part = y[:, off:off + n]
        if m in loras:
            part = (part.astype(jnp.float32) + loras[m](x)).astype(y.dtype)
        parts.append(part)
        off += n
    return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


class Attention(nnx.Module):
    """Fused q|k|v projection (+ bias for Qwen2), RoPE, paged attention, output projection."""

    def __init__(self, cfg: ModelConfig, dtype, stacked: Optional[int] = None):
        self.cfg = cfg
        H = cfg.hidden_size
        self.wqkv = _param((H, cfg.q_size + 2 * cfg.kv_size), dtype, "wqkv", stacked)
        self.bqkv = _param((cfg.q_size + 2 * cfg.kv_size,), dtype, "bqkv", stacked) if cfg.attention_bias else None
        self.wo = _param((cfg.q_size, H), dtype, "wo", stacked)
        self.lora = nnx.data(None)  # {projection: LoRA} while training (attach_lora)

    def __call__(self, x, pool, l, tables, inp, st: StepStatics):
        """x [T, H] (normed) -> (attention output [T, H], pool with this layer's K/V written)."""
        cfg = self.cfg
        D = cfg.head_dim
        Nq, Nkv, _ = _local_heads(cfg, st.tp)
        T = x.shape[0]
        pos = inp["positions"]
        rope = inp["rope"] if "rope" in inp else rope_tables(pos, cfg)  # Llama.__call__ makes it once a step
        sm_scale = 1.0 / math.sqrt(D)
        qkv = _linear(x, self.wqkv[...])
        if self.bqkv is not None:
            qkv = qkv + self.bqkv[...]
        qkv_sizes = group_dims(cfg, "qkv", st.tp)[1]
        qkv = _dense_lora(_lora(qkv, x, pool, l, tables, inp, "qkv", qkv_sizes, st), x, self.lora, "qkv", qkv_sizes)
        q = qkv[:, :Nq * D].reshape(T, Nq, D)
        k = qkv[:, Nq * D:(Nq + Nkv) * D].reshape(T, Nkv, D)
        v = qkv[:, (Nq + Nkv) * D:].reshape(T, Nkv, D)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        if pool is not None:  # None: nothing is cached (scoring, training)
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
        o = _linear(attn, self.wo[...])
        o_sizes = group_dims(cfg, "o", st.tp)[1]
        o = _dense_lora(_lora(o, attn, pool, l, tables, inp, "o", o_sizes, st), attn, self.lora, "o", o_sizes)
        # Each device's heads give a partial sum of o (its LoRA delta too): one all-reduce completes both.
        return all_reduce(o, st.tp), pool


class MLP(nnx.Module):
    """SwiGLU: fused gate|up projection, silu(gate) * up, down projection."""

    def __init__(self, cfg: ModelConfig, dtype, stacked: Optional[int] = None):
        self.cfg = cfg
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.w_gate_up = _param((H, 2 * I), dtype, "w_gate_up", stacked)
        self.w_down = _param((I, H), dtype, "w_down", stacked)
        self.lora = nnx.data(None)  # {projection: LoRA} while training (attach_lora)

    def __call__(self, x, pool, l, tables, inp, st: StepStatics):
        cfg = self.cfg
        gu = _linear(x, self.w_gate_up[...])
        gu_sizes = group_dims(cfg, "gate_up", st.tp)[1]
        gu = _dense_lora(_lora(gu, x, pool, l, tables, inp, "gate_up", gu_sizes, st), x, self.lora, "gate_up", gu_sizes)
        I = _local_heads(cfg, st.tp)[2]
        a = (jax.nn.silu(gu[:, :I].astype(jnp.float32)) * gu[:, I:].astype(jnp.float32)).astype(x.dtype)
        d = _linear(a, self.w_down[...])
        d_sizes = group_dims(cfg, "down", st.tp)[1]
        d = _dense_lora(_lora(d, a, pool, l, tables, inp, "down", d_sizes, st), a, self.lora, "down", d_sizes)
        return all_reduce(d, st.tp)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: h + attn(norm(h)), then h + mlp(norm(h)). ``stacked=L`` holds the weights
    of all L layers on a leading axis (the scanned model's single layer)."""

    def __init__(self, cfg: ModelConfig, dtype, stacked: Optional[int] = None):
        self.cfg = cfg
        self.attn_norm = _param((cfg.hidden_size,), dtype, "attn_norm", stacked)
        self.mlp_norm = _param((cfg.hidden_size,), dtype, "mlp_norm", stacked)
        self.attn = Attention(cfg, dtype, stacked)
        self.mlp = MLP(cfg, dtype, stacked)

    def __call__(self, h, pool, l, tables, inp, st: StepStatics):
        """h [T, H] -> (h [T, H], pool); ``l`` is this layer's index in the pool (an int32 scalar)."""
        eps = self.cfg.rms_norm_eps
        o, pool = self.attn(rms_norm(h, self.attn_norm[...], eps), pool, l, tables, inp, st)
        h = h + o
        h = h + self.mlp(rms_norm(h, self.mlp_norm[...], eps), pool, l, tables, inp, st)
        return h, pool


class Llama(nnx.Module):
    """The Llama-family decoder. ``Llama(cfg, dtype, scan_layers=...)`` makes one with zero weights; build
    it under ``nnx.eval_shape`` and fill it with :func:`from_params` (what checkpoint loading does).

    ``scan_layers=True``: ``layers`` is one DecoderLayer with weights stacked over layers, run by a scan (one
    compiled layer body: fast compiles). False: ``layers`` is a list of DecoderLayers, unrolled in the
    program (each layer's weights read where they lie: faster decode on GPUs)."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, *, scan_layers: bool = True):
        self.cfg = cfg
        self.scan_layers = scan_layers
        self.embed = _param((cfg.vocab_size, cfg.hidden_size), dtype, "embed", None)
        self.final_norm = _param((cfg.hidden_size,), dtype, "final_norm", None)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else _param((cfg.hidden_size, cfg.vocab_size), dtype, "lm_head", None))
        if scan_layers:
            self.layers = DecoderLayer(cfg, dtype, stacked=cfg.num_layers)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers)])

    def __call__(self, pool: jax.Array, tables: dict, inp: dict, st: StepStatics):
        """Run all layers over the step's tokens; returns (final hidden states [T, H], updated pool).

        pool: the unified page pool [L, P, R, W] (K/V and LoRA pages), or None (prefill mode only: nothing
        cached, no LoRA); tables: {group: (a_pages, b_pages, ranks, scales)} adapter index tables, or None;
        inp (all arrays, shapes bucketed by the engine):
          tokens [T], positions [T], k_rows/v_rows [T] (flat pool rows page*R+i where this token's K/V go;
          -1 = do not store);
          decode (T = B, one token per request): token_slot [T] (-1 = base model), k_pages/v_pages [B, NB],
            lengths [B] (tokens in cache after this step's write);
          mixed (decode tokens first, then prompt chunks; N = min(T, rows) rows of page tables):
            k_pages/v_pages [N, NB] (decode token i is row i), lengths [N] (decode attention; 0 = not a
            decode token), token_row [T] (prompt tokens: their row; -1 otherwise), slot_decode [N] /
            slot_prefill [T] (adapter slot of the decode / prompt tokens, -1 elsewhere);
          prefill (scoring, nothing cached): token_slot [T], segment_ids [T] (-1 = padding).
        """
        embed = self.embed[...]
        h = embed[inp["tokens"]].astype(embed.dtype)
        inp = dict(inp, rope=rope_tables(inp["positions"], self.cfg))
        if tables:
            slots = next(iter(tables.values()))[0].shape[0]
            if LORA_ONE_BLOCK in st.lora_groups:
                # The host picked this program because no adapter of the step has a rank above one block.
                tables = {g: (a[..., :1], b[..., :1], r, sc) for g, (a, b, r, sc) in tables.items()}
            if lora_tiles(st):
                # One plan for every layer and group: it depends on the slots only, and costs as much as one call.
                inp["lora_plan"] = pk.lora_decode_plan(inp["token_slot"], slots)
            if st.mode == "mixed":
                # MBGMM's tile list likewise, once for every layer and group (the XLA path leaves it unused: removed).
                inp["lora_prefill_tiles"] = pk.lora_prefill_tiles(inp["slot_prefill"], slots)
        if self.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(carry, xs):
                h, pool = carry
                layer_state, l = xs
                return nnx.merge(graphdef, layer_state)(h, pool, l, tables, inp, st), None

            idx = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
            (h, pool), _ = jax.lax.scan(body, (h, pool), (state, idx))
        else:
            for l, layer in enumerate(self.layers):
                h, pool = layer(h, pool, jnp.int32(l), tables, inp, st)
        return rms_norm(h, self.final_norm[...], self.cfg.rms_norm_eps), pool

    def logits(self, h: jax.Array) -> jax.Array:
        """h [N, H] -> float32 logits [N, V] (tied embeddings when there is no lm_head)."""
        return _dot(h, self.embed[...].T if self.lm_head is None else self.lm_head[...])

    def causal_lm_logits(self, tokens: jax.Array, valid: Optional[jax.Array] = None,
                         backend: Optional[str] = "xla") -> jax.Array:
        """Float32 logits [B, T, V] of right-padded rows tokens [B, T] (valid [B, T] bool, False on padding;
        None = all real), each row causal on its own; no cache, no page pool. Differentiable with the
        default "xla" kernels: the entry point for research code (``jax.grad`` through the model)."""
        B, T = tokens.shape
        valid = jnp.ones((B, T), bool) if valid is None else valid
        rows = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))
        inp = {"tokens": tokens.reshape(-1), "positions": jnp.tile(jnp.arange(T, dtype=jnp.int32), B),
               "segment_ids": jnp.where(valid, rows, -1).reshape(-1)}
        h, _ = self(None, None, inp, StepStatics(mode="prefill", backend=backend, lora_groups=()))
        return self.logits(h).reshape(B, T, -1)

    # -- the fused-weights pytree view (checkpoint loading, merged-adapter benchmarks, adapter training)
    def params(self) -> dict:
        """The weights as the fused pytree (``fuse_params`` of ``load_params``; layers stacked when scanned, a
        list of per-layer dicts when unrolled). The arrays are the model's own, not copies."""
        def layer_dict(layer):
            d = {"attn_norm": layer.attn_norm[...], "mlp_norm": layer.mlp_norm[...], "wqkv": layer.attn.wqkv[...],
                 "wo": layer.attn.wo[...], "w_gate_up": layer.mlp.w_gate_up[...], "w_down": layer.mlp.w_down[...]}
            if layer.attn.bqkv is not None:
                d["bqkv"] = layer.attn.bqkv[...]
            return d
        out = {"embed": self.embed[...], "final_norm": self.final_norm[...]}
        if self.lm_head is not None:
            out["lm_head"] = self.lm_head[...]
        out["layers"] = layer_dict(self.layers) if self.scan_layers else [layer_dict(x) for x in self.layers]
        return out

    def set_params(self, params: dict) -> None:
        """Replace the weights with a fused pytree of the same layout (as :meth:`params` gives); arrays are
        taken as they are (their dtype and placement are the caller's): whole values are replaced, never
        written into the old arrays."""
        def fill(layer, d):
            _replace(layer.attn_norm, d["attn_norm"])
            _replace(layer.mlp_norm, d["mlp_norm"])
            _replace(layer.attn.wqkv, d["wqkv"])
            _replace(layer.attn.wo, d["wo"])
            if layer.attn.bqkv is not None:
                _replace(layer.attn.bqkv, d["bqkv"])
            _replace(layer.mlp.w_gate_up, d["w_gate_up"])
            _replace(layer.mlp.w_down, d["w_down"])
        _replace(self.embed, params["embed"])
        _replace(self.final_norm, params["final_norm"])
        if self.lm_head is not None:
            _replace(self.lm_head, params["lm_head"])
        if self.scan_layers:
            fill(self.layers, params["layers"])
        else:
            for layer, d in zip(self.layers, params["layers"], strict=True):
                fill(layer, d)


def from_params(params: dict, cfg: ModelConfig, *, scan_layers: bool = True, place=None) -> Llama:
    """A Llama holding ``params`` (``load_params`` layout, fused or not, layers stacked or, for an unrolled
    model, a list of per-layer dicts): no weights are initialised first. ``place(array, logical_axes)`` puts
    each weight where it goes (device, sharding, dtype); None keeps the arrays as they are."""
    lay = params["layers"]
    if isinstance(lay, (list, tuple)):  # unrolled already (an unrolled model's ``params()``)
        if "wq" in lay[0]:
            lay = [fuse_params({"layers": d}, cfg)["layers"] for d in lay]
        if scan_layers:
            raise ModelError("from_params: per-layer weights make an unrolled model; pass scan_layers=False")
    elif "wq" in lay:
        lay = fuse_params(params, cfg)["layers"]
    dtype = params["embed"].dtype
    model = nnx.eval_shape(lambda: Llama(cfg, dtype, scan_layers=scan_layers))
    if not scan_layers and isinstance(lay, dict):
        lay = [{k: v[l] for k, v in lay.items()} for l in range(cfg.num_layers)]
    model.set_params({**params, "layers": lay})
    if place is not None:
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda v: v.replace(place(v[...], param_axes(v))), state,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
        model = nnx.merge(graphdef, state)
    return model


def attach_lora(model: Llama, lora: dict, scales: dict) -> Llama:
    """Give ``model``'s projections dense, trainable LoRA weights (in place; returns the model).

    lora: {projection: {"a": [L, r, d_in], "b": [L, r, d_out]}} (``slora_jax.adapters.ModuleLora``'s layout,
    b = lora_B.weight^T); scales: {projection: [L]}. Projections absent from ``lora`` stay as they are.
    Differentiate with respect to ``nnx.LoRAParam`` to train only these."""
    def loras_for(layer, group_modules, pick):
        found = {m: LoRA(pick(lora[m]["a"]), pick(lora[m]["b"]), pick(scales[m])) for m in group_modules
                 if m in lora}
        return nnx.Dict(found) if found else None

    attn_mods = LORA_GROUPS["qkv"] + LORA_GROUPS["o"]
    mlp_mods = LORA_GROUPS["gate_up"] + LORA_GROUPS["down"]
    layers = [(model.layers, lambda a: a)] if model.scan_layers else [
        (layer, lambda a, l=l: a[l]) for l, layer in enumerate(model.layers)]
    for layer, pick in layers:
        layer.attn.lora = loras_for(layer, attn_mods, pick)
        layer.mlp.lora = loras_for(layer, mlp_mods, pick)
    return model


def lora_of(model: Llama) -> dict:
    """The model's dense LoRA weights as {projection: {"a": [L, r, d_in], "b": [L, r, d_out]}} (what
    :func:`attach_lora` takes), stacked over layers whether the model's layers are scanned or not."""
    layers = [model.layers] if model.scan_layers else list(model.layers)
    out: dict = {}
    for block in ("attn", "mlp"):
        loras = [getattr(layer, block).lora for layer in layers]
        if loras[0] is None:
            continue
        for m in loras[0]:
            a = [x[m].a[...] for x in loras]
            b = [x[m].b[...] for x in loras]
            out[m] = ({"a": a[0], "b": b[0]} if model.scan_layers
                      else {"a": jnp.stack(a), "b": jnp.stack(b)})
    return out
