"""Kernels of multi-adapter LoRA serving over one unified page pool, each beside its plain-JAX reference.

Public ops (each takes `implementation=None | "xla" | "pallas"`; None = Pallas on GPU, XLA elsewhere;
"pallas" off-GPU runs the same kernel in interpret mode):
  lora_decode, lora_prefill, paged_decode_attention, paged_prefill_attention, prefill_attention, write_kv.
`lora_decode_grouping(slots)` picks MBGMV's kernels for a batch on the host, `lora_decode_plan(token_slot, S)`
computes the "tiles" grouping's plan once for every call of a step, `lora_prefill_tiles(token_slot, S)` MBGMM's
tile list likewise, and `lora_tiles_unsupported(...)` says when
a pool rules the tile kernels out.
All are plain JAX functions (jit, vmap, jax.shard_map). Under shard_map the compiled kernels work
with check_vma on; interpret-mode Pallas (CPU) needs `check_vma=False` on jax 0.10.
`unsupported_ops(head_dim=..., ...)` names, before any call, the ops whose Pallas kernel cannot take a
model's shapes (and why), so an engine can reject or route them to XLA when it is built.
The pool holds float elements; a bfloat16 pool on a CPU is stored as uint16 bits (`pool_storage`: XLA:CPU
widens a bf16 write into a float32 pass over the whole pool), which the XLA path reads and writes and the
Pallas kernels refuse (None picks XLA for it).
Bad static inputs (shapes, dtypes, options) raise `KernelInputError` (a ValueError); traced
indices are clipped into range (layer, page ids, lengths) or treated as "none" (slots outside
[0, S), rows < 0), identically on every backend.
"""

from pallas_kernels import pool_storage
from pallas_kernels._errors import KernelInputError
from pallas_kernels.ops.lora_decode.api import lora_decode, lora_decode_grouping, lora_decode_may_tile, lora_decode_plan
from pallas_kernels.ops.lora_prefill.api import lora_prefill, lora_prefill_tiles
from pallas_kernels.ops.paged_decode_attention.api import paged_decode_attention
from pallas_kernels.ops.paged_prefill_attention.api import paged_prefill_attention
from pallas_kernels.ops.prefill_attention.api import prefill_attention
from pallas_kernels.ops.write_kv.api import write_kv
from pallas_kernels.support import lora_tiles_unsupported, unsupported_ops

__all__ = ["KernelInputError", "lora_decode", "lora_decode_grouping", "lora_decode_may_tile", "lora_decode_plan",
           "lora_prefill", "lora_prefill_tiles", "lora_tiles_unsupported", "paged_decode_attention",
           "paged_prefill_attention",
           "prefill_attention", "write_kv", "unsupported_ops", "pool_storage"]
