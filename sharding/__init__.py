"""Device meshes and partition rules: how the same model code runs on 1 or N devices.

Model code names the logical axes of its arrays (``slora_jax.model.llama.PARAM_AXES``); the rules here map
logical axes to mesh axes. The decoder itself runs under ``shard_decoder`` (shard_map) with the collectives
placed by hand, so that Pallas kernels run on each device's heads (``tensor_parallel``).
"""

from sharding.mesh import MODEL_AXIS, make_mesh
from sharding.rules import DEFAULT_RULES, logical_spec, named_sharding, tree_shardings
from sharding.tensor_parallel import (COLUMN_PARALLEL, ROW_PARALLEL, TensorParallelError, TensorParallelLayout,
                                      all_reduce, shard_decoder)

__all__ = ["COLUMN_PARALLEL", "DEFAULT_RULES", "MODEL_AXIS", "ROW_PARALLEL", "TensorParallelError",
           "TensorParallelLayout", "all_reduce", "logical_spec", "make_mesh", "named_sharding", "shard_decoder",
           "tree_shardings"]
