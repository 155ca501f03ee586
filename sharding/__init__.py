"""Device meshes and partition rules: how the same model code runs on 1 or N devices.

Model code names the logical axes of its arrays (``slora_jax.model.llama.PARAM_AXES``); the rules here map
logical axes to mesh axes, and XLA's SPMD partitioner inserts the collectives.
"""

from sharding.mesh import MODEL_AXIS, make_mesh
from sharding.rules import DEFAULT_RULES, logical_spec, named_sharding, tree_shardings

__all__ = ["DEFAULT_RULES", "MODEL_AXIS", "logical_spec", "make_mesh", "named_sharding", "tree_shardings"]
