"""Device meshes and partition rules: how the same model code runs on 1 or N devices, in one process or several.

Model code names the logical axes of its arrays (``slora_jax.model.llama.PARAM_AXES``); the rules here map
logical axes to mesh axes. The decoder itself runs under ``shard_decoder`` (shard_map) with the collectives
placed by hand, so that Pallas kernels run on each device's heads (``tensor_parallel``). ``distributed``
joins several processes into one mesh.
"""

from sharding.distributed import HostBroadcast, fetch, initialize, is_multiprocess, put, smallest
from sharding.mesh import MODEL_AXIS, make_mesh
from sharding.rules import DEFAULT_RULES, logical_spec, named_sharding, tree_shardings
from sharding.tensor_parallel import (COLUMN_PARALLEL, ROW_PARALLEL, TensorParallelError, TensorParallelLayout,
                                      all_reduce, shard_decoder)

__all__ = ["COLUMN_PARALLEL", "DEFAULT_RULES", "HostBroadcast", "MODEL_AXIS", "ROW_PARALLEL", "TensorParallelError",
           "TensorParallelLayout", "all_reduce", "fetch", "initialize", "is_multiprocess", "logical_spec",
           "make_mesh", "named_sharding", "put", "shard_decoder", "smallest", "tree_shardings"]
