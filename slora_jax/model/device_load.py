"""Base checkpoint -> the fused weights the step programs read, built on the device.

``load_fused_params`` memory-maps the safetensors files, puts each layer's tensors on the device as they
are stored (HF's [out, in], the file's dtype) from a pool of threads, and builds the fused layout there
with one jitted program per layer: transposes, q|k|v and gate|up concatenated, cast to the engine dtype.
No numpy copy of the weights is made, and the host does no transposing or casting.

The result is the fused pytree (``llama.fuse_params`` of ``checkpoint.load_params``, placed):

    {"embed": [V, H], "final_norm": [H], "lm_head": [H, V] (absent with tied embeddings),
     "layers": {"attn_norm", "wqkv" [H, (Nq+2Nkv)D], "bqkv" (attention_bias), "wo", "mlp_norm",
                "w_gate_up" [H, 2I], "w_down"} stacked on a leading layer axis (``scan_layers``), or a list
               of per-layer dicts (unrolled layers)}

each leaf on ``device``, or sharded over ``mesh`` by ``llama.PARAM_AXES``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sharding import is_multiprocess, put as place_on
from slora_jax.config import ModelConfig
from slora_jax.model.checkpoint import (SAFETENSORS_NUMPY, check_tensors, checkpoint_files, numpy_dtype,
                                        tensor_slots, tensor_spans)

# Per-layer HF tensors by their key in load_params' layout.
_LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
_BIAS_KEYS = ("bq", "bk", "bv")


def fused_shapes(config: ModelConfig) -> dict:
    """The fused pytree with shape tuples for leaves; ``layers`` holds one layer's shapes."""
    h, i, q, kv, v = (config.hidden_size, config.intermediate_size, config.q_size, config.kv_size,
                      config.vocab_size)
    layer = {"attn_norm": (h,), "wqkv": (h, q + 2 * kv), "wo": (q, h), "mlp_norm": (h,),
             "w_gate_up": (h, 2 * i), "w_down": (i, h)}
    if config.attention_bias:
        layer["bqkv"] = (q + 2 * kv,)
    out = {"embed": (v, h), "final_norm": (h,), "layers": layer}
    if not config.tie_word_embeddings:
        out["lm_head"] = (h, v)
    return out


def _sharding(name: str, shape: tuple, stacked: bool, device, mesh):
    """Where one leaf goes: ``device``, or its PARAM_AXES split over ``mesh`` (a stacked layer axis first,
    never split)."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(device)
    from sharding import named_sharding
    from slora_jax.model.llama import PARAM_AXES

    axes = ((None,) if stacked else ()) + PARAM_AXES[name]
    return named_sharding(mesh, axes, shape)


def fused_abstract(config: ModelConfig, dtype: str, scan_layers: bool, device=None, mesh=None) -> dict:
    """The fused pytree as jax.ShapeDtypeStructs with their shardings (what orbax restores into)."""
    device = device or jax.devices()[0]
    jdt = jnp.dtype(numpy_dtype(dtype))
    shapes = fused_shapes(config)
    L = config.num_layers

    def leaf(name, shape, stacked=False):
        shape = ((L,) + shape) if stacked else shape
        return jax.ShapeDtypeStruct(shape, jdt, sharding=_sharding(name, shape, stacked, device, mesh))

    out = {k: leaf(k, s) for k, s in shapes.items() if k != "layers"}
    if scan_layers:
        out["layers"] = {k: leaf(k, s, True) for k, s in shapes["layers"].items()}
    else:
        out["layers"] = [{k: leaf(k, s) for k, s in shapes["layers"].items()} for _ in range(L)]
    return out


@functools.lru_cache(maxsize=None)
def _layer_program(bias: bool, dtype, shardings: tuple):
    """One layer's stored tensors -> its fused leaves, in ``dtype``, placed by ``shardings``."""
    keys = ("attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down") + (("bqkv",) if bias else ())

    def build(raw):
        t = {k: raw[k].astype(dtype) for k in raw}
        out = {"attn_norm": t["attn_norm"],
               "wqkv": jnp.concatenate([t["wq"].T, t["wk"].T, t["wv"].T], axis=-1),
               "wo": t["wo"].T, "mlp_norm": t["mlp_norm"],
               "w_gate_up": jnp.concatenate([t["w_gate"].T, t["w_up"].T], axis=-1),
               "w_down": t["w_down"].T}
        if bias:
            out["bqkv"] = jnp.concatenate([t["bq"], t["bk"], t["bv"]], axis=-1)
        return out

    return jax.jit(build, out_shardings=dict(zip(keys, shardings)))


@functools.lru_cache(maxsize=None)
def _top_program(dtype, transpose: bool, sharding):
    return jax.jit(lambda x: (x.T if transpose else x).astype(dtype), out_shardings=sharding)


def _insert(stacked: dict, layer: jax.Array, parts: dict) -> dict:
    return {k: stacked[k].at[layer].set(parts[k]) for k in stacked}


_insert_layer = jax.jit(_insert, donate_argnums=(0,))  # in place: the stacked buffers are never copied


def _maps(files: list[Path]) -> dict[Path, np.memmap]:
    return {p: np.memmap(p, dtype=np.uint8, mode="r") for p in files}


def load_fused_params(model_dir, config: ModelConfig, dtype: str, scan_layers: bool = True, device=None,
                      mesh=None, workers: Optional[int] = None, via_pinned_host: Optional[bool] = None) -> dict:
    """Read a HF safetensors checkpoint into the fused pytree (module docstring), built on the device.

    Layers are read and placed by ``workers`` threads (default: one per core, at most 8).
    ``via_pinned_host``: copy each stored tensor into pinned host memory first, so that the transfer to
    the device is a DMA rather than a pageable copy (35x slower on the H200, reference/GPU.md); None:
    where the device has pinned host memory (one GPU). Raises ModelError naming any missing, unexpected,
    misshapen or unreadable tensor or file, before anything is placed."""
    device = device or jax.devices()[0]
    jdt = jnp.dtype(numpy_dtype(dtype))
    slots = tensor_slots(config)
    files = checkpoint_files(model_dir)
    where = tensor_spans(files)
    check_tensors(model_dir, config, slots, where)
    maps = _maps(files)
    by_slot = {(s.key, s.layer): name for name, s in slots.items()}
    # Stored tensors go to the device unsplit (replicated over a mesh); the layer program splits them.
    raw_place = (jax.sharding.SingleDeviceSharding(device) if mesh is None
                 else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    if via_pinned_host is None:
        via_pinned_host = mesh is None and device.platform == "gpu"
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host") if via_pinned_host else None

    def put(x: np.ndarray) -> jax.Array:
        if pinned is not None:
            x = jax.device_put(x, pinned)
        return place_on(x, raw_place)  # several processes: each places its own devices' copies

    def stored(name: str) -> np.ndarray:
        path, span = where[name]
        return maps[path][span.start:span.end].view(SAFETENSORS_NUMPY[span.dtype]).reshape(span.shape)

    shapes = fused_shapes(config)
    layer_keys = tuple(shapes["layers"])
    out_keys = ("attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down") + (
        ("bqkv",) if config.attention_bias else ())
    layer_shardings = tuple(_sharding(k, shapes["layers"][k], False, device, mesh) for k in out_keys)
    program = _layer_program(config.attention_bias, jdt, layer_shardings)
    keys = _LAYER_KEYS + (_BIAS_KEYS if config.attention_bias else ())

    def one_layer(layer: int) -> dict:
        raw = {k: put(stored(by_slot[(k, layer)])) for k in keys}
        return program(raw)

    params: dict = {}
    for key in ("embed", "final_norm", "lm_head"):
        if key in shapes:
            name = by_slot[(key, None)]
            prog = _top_program(jdt, slots[name].transpose, _sharding(key, shapes[key], False, device, mesh))
            params[key] = prog(put(stored(name)))

    L = config.num_layers
    stacked = None
    if scan_layers:
        abstract = fused_abstract(config, dtype, True, device, mesh)["layers"]
        stacked = jax.jit(lambda: {k: jnp.zeros(a.shape, a.dtype) for k, a in abstract.items()},
                          out_shardings={k: a.sharding for k, a in abstract.items()})()
    per_layer: list = [None] * L
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if is_multiprocess():
        # A program over several processes' devices must start in the same order on each (XLA pairs their
        # collectives by order): one thread places the layers in layer order.
        workers = 1
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="checkpoint-read") as pool:
        # A window of layers in flight bounds the device memory held by layers not yet inserted.
        pending: dict = {}
        next_layer = 0
        while next_layer < L or pending:
            while next_layer < L and len(pending) < 2 * workers:
                pending[pool.submit(one_layer, next_layer)] = next_layer
                next_layer += 1
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                layer = pending.pop(fut)
                parts = fut.result()
                if stacked is not None:
                    stacked = _insert_layer(stacked, jnp.int32(layer), {k: parts[k] for k in layer_keys})
                else:
                    per_layer[layer] = parts
    params["layers"] = stacked if stacked is not None else per_layer
    jax.block_until_ready(params)  # the memory maps (closed on return) must outlive the copies out of them
    return params


__all__ = ["fused_abstract", "fused_shapes", "load_fused_params"]
