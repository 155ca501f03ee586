"""Random weights made directly on the device, for benchmarks at real model shapes (e.g. Llama-2-7B)
without writing or reading gigabytes of safetensors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

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


def _normal(seed: int, index, shape: tuple, dtype, std: float) -> jax.Array:
    """Weight ``index``'s values: N(0, std) drawn in float32 from the seed's key folded with the index (the
    same values on any device or split), then cast."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


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
            arr = make(lambda: _normal(seed, i, shape, dtype, std))
        if isinstance(k, tuple):
            out["layers"][name] = arr
        else:
            out[name] = arr
    return out


@functools.lru_cache(maxsize=None)
def _filler(shape: tuple, dtype, sharding, ones: bool, std: float, seed: int):
    """A program making one weight where ``sharding`` puts it (each device only its part), from the weight's
    index: one compilation per distinct shape, however many layers share it."""
    def make(index):
        return jnp.ones(shape, dtype) if ones else _normal(seed, index, shape, dtype, std)

    return jax.jit(make, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _gather(sharding):
    """A program that lays an array out as ``sharding`` says, device to device (no copy through the host)."""
    return jax.jit(lambda a: a, out_shardings=sharding)


def random_fused_params(cfg: ModelConfig, dtype: str = "bfloat16", *, scan_layers: bool = True, mesh=None,
                        device=None, seed: int = 0, std: float = 0.02) -> dict:
    """The fused pytree (what ``device_load.load_fused_params`` gives) filled with random values: each weight
    made where the engine keeps it, split over ``mesh`` by the partition rules when given. A model larger than
    one device (Llama-3-70B's 141 GB in bfloat16) is then never whole on one; an engine given these weights
    over the same mesh only reorders the fused q|k|v and gate|up columns (copies of those), as it does for a
    checkpoint. Matrices ~ N(0, std), norms = 1."""
    from slora_jax.model.device_load import fused_abstract

    abstract = fused_abstract(cfg, dtype, scan_layers, device=device, mesh=mesh)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    made = []
    for i, (path, leaf) in enumerate(leaves):
        name = str(getattr(path[-1], "key", path[-1]))
        ones, where = "norm" in name, leaf.sharding
        if mesh is not None and not ones and where.is_fully_replicated and leaf.shape[0] % mesh.size == 0:
            # A weight every device holds whole (the embedding table) is drawn a slice per device and then
            # gathered on the devices: drawing it whole on each device needs its float32 draw and the draw's
            # intermediates per device on the way (~10x the bfloat16 table: 21 GB for Llama-3-70B's). Same
            # values either way.
            where = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
        arr = _filler(tuple(leaf.shape), leaf.dtype, where, ones, float(std), int(seed))(np.uint32(i))
        made.append(arr if where is leaf.sharding else _gather(leaf.sharding)(arr))
    return jax.tree_util.tree_unflatten(treedef, made)
