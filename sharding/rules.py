"""Partition rules: logical axis names -> mesh axes, applied to pytrees of arrays.

Megatron-style defaults: attention heads (and the K/V width of the page pool), the MLP's intermediate
width and the vocabulary are split over the "model" axis; everything else is replicated. A logical axis
whose size the mesh does not divide stays replicated rather than failing.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import MODEL_AXIS

DEFAULT_RULES: Mapping[str, Optional[str]] = {
    "heads": MODEL_AXIS,  # q/k/v output columns, o input rows
    "kv_width": MODEL_AXIS,  # last axis of the page pool (K/V heads)
    "mlp": MODEL_AXIS,  # gate/up output columns, down input rows
    "vocab": MODEL_AXIS,  # lm_head columns
    # Replicated: the residual width, the embedding table's rows (gathered by token id), stacked layers.
    "embed": None,
    "vocab_rows": None,
    "layers": None,
}


def logical_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                 rules: Mapping[str, Optional[str]] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dimensions have the logical names ``axes``."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axes for an array of rank {len(shape)}")
    spec = []
    for name, size in zip(axes, shape):
        mesh_axis = rules.get(name) if name is not None else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis] != 0:
            mesh_axis = None  # not divisible: replicate this dimension
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[Optional[str]], shape: Sequence[int],
                   rules: Mapping[str, Optional[str]] = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, mesh, rules))


def tree_shardings(tree, axes_of, mesh: Mesh, rules: Mapping[str, Optional[str]] = DEFAULT_RULES):
    """A pytree of NamedShardings for ``tree``; ``axes_of(path, array)`` names each leaf's axes."""
    def one(path, leaf):
        return named_sharding(mesh, axes_of(path, leaf), leaf.shape, rules)
    return jax.tree_util.tree_map_with_path(one, tree)
