"""Fine-tune a LoRA on the base model with optax, and get it back as an adapter the engine serves.

    lora = train_lora(engine, None, sequences, rank=8, alpha=16, target_modules=("q_proj", "v_proj"),
                      steps=200, learning_rate=1e-3, batch_size=8)
    engine.load_adapter_weights("mine", lora)          # serve it now, next to the others
    save_peft_adapter(lora, "out/mine", "my-base")     # or share it: peft and the engine both load it

Training runs on the served model itself (``slora_jax.model.Llama``, its layers scanned or unrolled as the
source holds them) with dense LoRA weights attached (``attach_lora``); only the ``nnx.LoRAParam``s train.
The base model comes from an ``Engine`` (its on-device weights are used in place, no copy), a checkpoint
folder (read with ``load_params``) or a ``load_params`` pytree (fused or not). Base weights are frozen (in
the engine's dtype, or ``dtype``); LoRA weights train in float32 with AdamW (peft's init: A uniform, B 0).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slora_jax.adapters.peft import LoraWeights, ModuleLora
from slora_jax.config import MODULES, ModelConfig
from slora_jax.errors import AdapterError, ConfigError, ModelError, RequestError
from slora_jax.model.checkpoint import param_shapes
from flax import nnx

from slora_jax.model.llama import Llama, attach_lora, from_params, fuse_params, lora_of
from slora_jax.training.peft_format import peft_lora_config

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


@dataclass
class TrainedLora(LoraWeights):
    """A LoraWeights fresh from :func:`train_lora`, with the loss of every step (nats per token)."""

    loss_history: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------- lora


def resolve_targets(target_modules) -> tuple[str, ...]:
    """Normalise target_modules ("all-linear", or names from config.MODULES) to names in MODULES order."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return MODULES
        target_modules = [target_modules]
    try:
        names = list(target_modules)
    except TypeError:
        raise AdapterError(f"target_modules must be 'all-linear' or a list of {MODULES}, got {target_modules!r}")
    bad = [m for m in names if m not in MODULES]
    if bad or not names:
        raise AdapterError(f"target_modules must be a non-empty subset of {MODULES} (or 'all-linear'), got {names}")
    return tuple(m for m in MODULES if m in names)


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def init_lora(model_config: ModelConfig, rank: int = 8, alpha: float = 16, target_modules=("q_proj", "v_proj"),
              use_rslora: bool = False, seed: int = 0, name: str = "lora") -> LoraWeights:
    """A fresh LoRA initialised as peft does: A [r, d_in] ~ U(+-1/sqrt(d_in)) (kaiming-uniform, a=sqrt(5)),
    B = 0, so the adapted model starts equal to the base. Every layer of each target module gets rank r.

    Returns LoraWeights with per module a [L, r, d_in], b [L, r, d_out] (= B^T), ranks [L], scales [L]."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise AdapterError(f"alpha must be a positive number, got {alpha!r}")
    targets = resolve_targets(target_modules)
    rng = np.random.default_rng(seed)
    L = model_config.num_layers
    scale = lora_scale(rank, alpha, use_rslora)
    modules = {}
    for m in targets:
        d_in, d_out = model_config.module_dims(m)
        bound = 1.0 / math.sqrt(d_in)
        modules[m] = ModuleLora(a=rng.uniform(-bound, bound, (L, rank, d_in)).astype(np.float32),
                                b=np.zeros((L, rank, d_out), np.float32),
                                ranks=np.full((L,), rank, np.int32), scales=np.full((L,), scale, np.float32))
    config = peft_lora_config(rank, alpha, list(targets), use_rslora, model_config.name)
    return LoraWeights(name=name, path="", modules=modules, rank=rank, target_modules=targets, config=config)


def lora_params(lora: LoraWeights) -> tuple[dict, dict]:
    """LoraWeights -> (trainable {module: {"a", "b"}} float32 jax arrays, scales {module: [L]})."""
    params = {m: {"a": jnp.asarray(ml.a, jnp.float32), "b": jnp.asarray(ml.b, jnp.float32)}
              for m, ml in lora.modules.items()}
    scales = {m: jnp.asarray(ml.scales, jnp.float32) for m, ml in lora.modules.items()}
    return params, scales


def _with_params(lora: LoraWeights, params: dict, name: str, losses: list) -> TrainedLora:
    modules = {m: ModuleLora(a=np.asarray(params[m]["a"], np.float32), b=np.asarray(params[m]["b"], np.float32),
                             ranks=ml.ranks.copy(), scales=ml.scales.copy()) for m, ml in lora.modules.items()}
    return TrainedLora(name=name, path="", modules=modules, rank=lora.rank, target_modules=lora.target_modules,
                       config=dict(lora.config), loss_history=losses)


# --------------------------------------------------------------------------------------------- base model


def fused_param_shapes(cfg: ModelConfig) -> dict:
    """Shapes of the fused weights pytree (``llama.fuse_params`` of ``load_params``)."""
    shapes = param_shapes(cfg)
    lay = dict(shapes["layers"])
    L, H = cfg.num_layers, cfg.hidden_size
    for key in ("wq", "wk", "wv", "w_gate", "w_up", "bq", "bk", "bv"):
        lay.pop(key, None)
    lay["wqkv"] = (L, H, cfg.q_size + 2 * cfg.kv_size)
    if cfg.attention_bias:
        lay["bqkv"] = (L, cfg.q_size + 2 * cfg.kv_size)
    lay["w_gate_up"] = (L, H, 2 * cfg.intermediate_size)
    return {**{k: v for k, v in shapes.items() if k != "layers"}, "layers": lay}


def _shapes(tree: dict) -> dict:
    """Shapes of a params pytree, its layers as stacked shapes [L, ...] whether they are stacked or unrolled
    (a list of per-layer dicts, as engines built with ``scan_layers=False`` hold them)."""
    out = {k: tuple(v.shape) for k, v in tree.items() if k != "layers"}
    layers = tree["layers"]
    if isinstance(layers, (list, tuple)):
        per_layer = [{k: tuple(v.shape) for k, v in lay.items()} for lay in layers]
        if not per_layer or any(p != per_layer[0] for p in per_layer):
            out["layers"] = per_layer  # ragged or empty: never equal to the expected shapes
        else:
            out["layers"] = {k: (len(per_layer),) + s for k, s in per_layer[0].items()}
    else:
        out["layers"] = {k: tuple(v.shape) for k, v in layers.items()}
    return out


def _is_fused(layers) -> bool:
    first = layers[0] if isinstance(layers, (list, tuple)) and layers else layers
    return isinstance(first, dict) and "wqkv" in first


def base_params(source, model_config: Optional[ModelConfig] = None, dtype: Optional[str] = None
                ) -> tuple[dict, ModelConfig]:
    """The frozen base weights for training: jax arrays in the fused layout the engine serves from
    (``llama.fuse_params``: wqkv [L, H, q+2kv], w_gate_up [L, H, 2I], the rest as ``load_params``). The layers
    stay as the source holds them: stacked on axis 0, or a list of per-layer dicts (an unrolled engine's).

    source: an ``Engine`` (its on-device weights, used as they are when ``dtype`` is None or the engine's;
    model_config may be None), a checkpoint folder (model_config may be None: read from config.json), or a
    ``load_params`` pytree, fused or not. dtype: 'float32' | 'bfloat16' | 'float16'; None = the engine's
    dtype for an Engine, float32 otherwise. Raises ModelError when the weights do not match model_config."""
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)} or None, got {dtype!r}")
    if hasattr(source, "base_params") and hasattr(source, "model_config"):  # an Engine
        model_config = model_config or source.model_config
        params = source.base_params()
        dtype = dtype or source.config.dtype
    elif isinstance(source, (str, os.PathLike)):
        from slora_jax.model.checkpoint import load_params
        from slora_jax.model.hf_config import load_model_config

        model_config = model_config or load_model_config(source)
        params = load_params(source, model_config, dtype or "float32")
    elif isinstance(source, dict):
        params = source
    else:
        raise ModelError(f"base model must be an Engine, a checkpoint folder or a params pytree, "
                         f"got {type(source).__name__}")
    if model_config is None:
        raise ModelError("model_config is required when the base model is given as a params pytree")
    if "layers" not in params or "embed" not in params:
        raise ModelError("params pytree must have 'embed' and 'layers' (the load_params layout)")
    fused = _is_fused(params["layers"])
    expected = fused_param_shapes(model_config) if fused else param_shapes(model_config)
    if _shapes(params) != expected:
        raise ModelError(f"params do not match the model config: expected shapes {expected}, got {_shapes(params)}")
    if not fused and isinstance(params["layers"], (list, tuple)):
        params = {**params, "layers": [fuse_params({"layers": lay}, model_config)["layers"]
                                       for lay in params["layers"]]}
    elif not fused:
        params = fuse_params(params, model_config)  # numpy stays on the host until the cast below
    target = _DTYPES[dtype or "float32"]
    return jax.tree.map(lambda a: jnp.asarray(a, target), params), model_config


# --------------------------------------------------------------------------------------------- data


def pack_sequences(sequences, vocab_size: int, max_len: int, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> (tokens [N, T] int32 right-padded with 0, valid [N, T] bool), T a multiple of
    ``multiple`` (one compiled shape for the whole run). RequestError names the first bad sequence."""
    if isinstance(sequences, np.ndarray):
        sequences = list(sequences)
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise RequestError("sequences must be a non-empty list of token-id lists")
    rows = []
    for i, seq in enumerate(sequences):
        seq = np.asarray(seq)
        if seq.ndim != 1 or seq.size < 2 or not np.issubdtype(seq.dtype, np.integer):
            raise RequestError(f"sequence {i} must be a list of at least 2 integer token ids, got {sequences[i]!r:.80}")
        if seq.min() < 0 or seq.max() >= vocab_size:
            raise RequestError(f"sequence {i} has token id {int(seq.max() if seq.max() >= vocab_size else seq.min())} "
                               f"outside the vocabulary [0, {vocab_size})")
        if seq.size > max_len:
            raise RequestError(f"sequence {i} has {seq.size} tokens, more than the model's {max_len} positions")
        rows.append(seq)
    T = min(max_len, -(-max(len(r) for r in rows) // multiple) * multiple)
    tokens = np.zeros((len(rows), T), np.int32)
    valid = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
        valid[i, :len(r)] = True
    return tokens, valid


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless stream of index batches: shuffled epochs, wrapping around so every batch is full."""
    order = np.empty(0, np.int64)
    while True:
        while order.size < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch_size]
        order = order[batch_size:]


# --------------------------------------------------------------------------------------------- training


def base_model(params: dict, cfg: ModelConfig) -> Llama:
    """The nnx Llama over a fused params pytree (as :func:`base_params` gives: its arrays, not copies); its
    layers are unrolled when the pytree's are a list (an unrolled engine's)."""
    return from_params(params, cfg, scan_layers=not isinstance(params["layers"], (list, tuple)))


def model_loss(model: Llama, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) of predicting tokens[:, 1:] from their prefixes, over real tokens only."""
    logits = model.causal_lm_logits(tokens, valid)[:, :-1]
    weight = (valid[:, 1:] & valid[:, :-1]).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def causal_lm_logits(params: dict, lora: dict, scales: dict, tokens: jax.Array, valid: jax.Array,
                     cfg: ModelConfig) -> jax.Array:
    """Float32 logits [B, T, V] of right-padded rows (tokens [B, T], valid [B, T] bool) through the model with
    ``lora`` ({projection: {"a", "b"}}, :func:`lora_params`) and its ``scales`` attached; {} = the base."""
    model = base_model(params, cfg)
    if lora:
        attach_lora(model, lora, scales)
    return model.causal_lm_logits(tokens, valid)


def next_token_loss(params: dict, lora: dict, scales: dict, tokens: jax.Array, valid: jax.Array,
                    cfg: ModelConfig) -> jax.Array:
    """:func:`model_loss` of the model with ``lora`` attached (arguments as :func:`causal_lm_logits`)."""
    model = base_model(params, cfg)
    if lora:
        attach_lora(model, lora, scales)
    return model_loss(model, tokens, valid)


def _train_step(trainable, opt_state, frozen, tokens, valid, *, graphdef, tx):
    """One AdamW step on the LoRA weights (``trainable``: the model's LoRAParams; ``frozen``: the rest)."""
    def loss_fn(trainable):
        return model_loss(nnx.merge(graphdef, trainable, frozen), tokens, valid)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def train_lora(engine_or_params, model_config: Optional[ModelConfig], sequences: Sequence[Sequence[int]], *,
               rank: int = 8, alpha: float = 16, target_modules=("q_proj", "v_proj"), steps: int = 100,
               learning_rate: float = 1e-3, batch_size: int = 8, seed: int = 0, use_rslora: bool = False,
               weight_decay: float = 0.0, max_grad_norm: Optional[float] = 1.0, dtype: Optional[str] = None,
               name: str = "trained", progress: bool = True) -> TrainedLora:
    """Train a LoRA for next-token prediction on ``sequences`` (token-id lists, each its own sample).

    engine_or_params: an Engine, a checkpoint folder or a load_params pytree (see :func:`base_params`);
    model_config may be None for the first two; ``dtype`` is the frozen base's (None: the engine's own weights
    as they are, float32 for the others). Each of ``steps`` AdamW steps (optax; global-norm clipping
    at ``max_grad_norm``) takes ``batch_size`` sequences, right-padded to one length, from shuffled epochs.
    The LoRA starts as :func:`init_lora` makes it (B = 0: the base model's outputs). ``progress`` shows a
    tqdm bar with the loss.

    Returns a TrainedLora (a LoraWeights: ``engine.load_adapter_weights`` and ``save_peft_adapter`` take it)
    whose ``loss_history`` holds each step's mean token loss. Raises AdapterError (rank, alpha, targets),
    ConfigError (steps, learning rate, batch size), RequestError (sequences), ModelError (base weights).
    """
    _positive_int("steps", steps)
    _positive_int("batch_size", batch_size)
    _positive_number("learning_rate", learning_rate)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ConfigError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if max_grad_norm is not None:
        _positive_number("max_grad_norm", max_grad_norm)
    base, cfg = base_params(engine_or_params, model_config, dtype)
    lora = init_lora(cfg, rank, alpha, target_modules, use_rslora, seed, name)
    limit = getattr(getattr(engine_or_params, "config", None), "max_lora_rank", None)
    if limit is not None and lora.rank > limit:
        raise AdapterError(f"rank {lora.rank} is above this engine's max_lora_rank={limit}; it could not be served")
    tokens, valid = pack_sequences(sequences, cfg.vocab_size, cfg.max_position_embeddings)

    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
    if max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    model = attach_lora(base_model(base, cfg), *lora_params(lora))
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    opt_state = tx.init(params)
    step_fn = jax.jit(functools.partial(_train_step, graphdef=graphdef, tx=tx), donate_argnums=(0, 1))

    batches = _batches(len(tokens), batch_size, np.random.default_rng(seed))
    bar = _progress(steps) if progress else None
    device_losses = []
    for i in range(steps):
        idx = next(batches)
        params, opt_state, loss = step_fn(params, opt_state, frozen, tokens[idx], valid[idx])
        device_losses.append(loss)
        if bar is not None:
            bar.update(1)
            if i % 10 == 9 or i == steps - 1:  # reading the loss waits for the device: not every step
                bar.set_postfix(loss=f"{float(loss):.4f}")
    if bar is not None:
        bar.close()
    losses = [float(x) for x in jax.device_get(device_losses)]
    if not all(math.isfinite(x) for x in losses):
        raise ConfigError(f"training diverged (loss {losses[-1]}); lower learning_rate={learning_rate}")
    return _with_params(lora, lora_of(nnx.merge(graphdef, params, frozen)), name, losses)


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train LoRA", unit="step")
