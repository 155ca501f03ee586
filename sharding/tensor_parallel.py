"""Megatron tensor parallelism with hand-placed collectives, so that Pallas kernels run on every device.

XLA cannot partition a Pallas call, so the decoder runs under one ``shard_map`` over the "model" mesh axis:
inside it each device sees its own heads, MLP columns and pool columns as plain arrays, the kernels run on
those, and the only collectives are the two all-reduces of the residual stream per layer (after the
attention output projection and after the MLP down projection), as in Megatron-LM.

What each device holds (device ``i`` of ``tp``):
* q heads ``i*Nq/tp ..``; K/V heads ``i*Nkv/tp ..``, or, when ``tp`` is a multiple of ``Nkv`` (e.g. one KV
  head at tp=2), KV head ``i // (tp/Nkv)`` replicated on ``tp/Nkv`` devices, as vLLM does;
* MLP columns ``i*I/tp ..`` of gate and up, the same rows of down;
* the page pool's columns ``i*Wl ..`` with ``Wl`` its local K/V width; the pool's global width is
  ``tp * Wl``, which exceeds the model's K/V width only when KV heads are replicated.

The fused q|k|v (and gate|up) weights are stored shard-major, ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``, so a
contiguous split of their columns gives each device ``[q_i k_i v_i]``: splitting q, k and v inside the layer
moves no data (with the model's own order, every device would need a collective-permute to find its k, v).

LoRA follows the base weights' partition (S-LoRA's scheme) with no collective of its own:
* column-parallel projections (q/k/v, gate/up): every device holds all of A (x is replicated) and B's
  columns of its own outputs;
* row-parallel projections (o, down): every device holds A's rows of its own inputs and all of B, so its
  delta ``(x_i A_i) B`` is a partial sum that the base projection's all-reduce completes:
  ``sum_i (x_i A_i) B = (x A) B``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from sharding.mesh import MODEL_AXIS

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


class TensorParallelError(ValueError):
    """A model shape that ``tp`` devices cannot split."""


@dataclass(frozen=True)
class TensorParallelLayout:
    """Which slice of every weight, pool column and LoRA matrix device ``i`` of ``tp`` holds.

    ``cfg``: a model config with hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size."""

    cfg: object
    tp: int

    def __post_init__(self):
        cfg, tp = self.cfg, self.tp
        if not isinstance(tp, int) or tp < 1:
            raise TensorParallelError(f"tensor_parallel must be a positive integer, got {tp!r}")
        if cfg.num_heads % tp:
            raise TensorParallelError(f"tensor_parallel={tp} must divide num_heads={cfg.num_heads}")
        nkv = cfg.num_kv_heads
        if nkv % tp and tp % nkv:
            raise TensorParallelError(
                f"tensor_parallel={tp} neither divides nor is a multiple of num_kv_heads={nkv}: the KV heads "
                f"can be neither split evenly nor replicated evenly over {tp} devices")
        if cfg.intermediate_size % tp:
            raise TensorParallelError(f"tensor_parallel={tp} must divide intermediate_size={cfg.intermediate_size}")

    # -- local sizes
    @property
    def q_heads(self) -> int:
        return self.cfg.num_heads // self.tp

    @property
    def kv_heads(self) -> int:
        """KV heads per device (1 when they are replicated)."""
        return max(1, self.cfg.num_kv_heads // self.tp)

    @property
    def kv_copies(self) -> int:
        """Devices that hold each KV head (1 unless tp is a multiple of num_kv_heads)."""
        return max(1, self.tp // self.cfg.num_kv_heads)

    @property
    def intermediate(self) -> int:
        return self.cfg.intermediate_size // self.tp

    @property
    def kv_width(self) -> int:
        """A device's K/V width: its columns of every pool page."""
        return self.kv_heads * self.cfg.head_dim

    @property
    def pool_width(self) -> int:
        """The pool's global width (``cfg.kv_size`` unless KV heads are replicated)."""
        return self.tp * self.kv_width

    # -- which columns device i holds, in the model's (unsharded) numbering
    def out_columns(self, module: str, i: int) -> slice:
        """The output columns of ``module`` that device ``i`` computes (all, for row-parallel ones)."""
        cfg, D = self.cfg, self.cfg.head_dim
        if module == "q_proj":
            n = self.q_heads * D
            return slice(i * n, (i + 1) * n)
        if module in ("k_proj", "v_proj"):
            head = (i // self.kv_copies) * self.kv_heads
            return slice(head * D, (head + self.kv_heads) * D)
        if module in ("gate_proj", "up_proj"):
            return slice(i * self.intermediate, (i + 1) * self.intermediate)
        if module == "o_proj" or module == "down_proj":
            return slice(0, cfg.hidden_size)
        raise KeyError(module)

    def in_columns(self, module: str, i: int) -> slice:
        """The input features of ``module`` that device ``i`` holds (all, for column-parallel ones)."""
        if module == "o_proj":
            n = self.q_heads * self.cfg.head_dim
            return slice(i * n, (i + 1) * n)
        if module == "down_proj":
            return slice(i * self.intermediate, (i + 1) * self.intermediate)
        if module in COLUMN_PARALLEL:
            return slice(0, self.cfg.hidden_size)
        raise KeyError(module)

    def local_dims(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of ``module`` on one device."""
        a, b = self.in_columns(module, 0), self.out_columns(module, 0)
        return a.stop - a.start, b.stop - b.start

    def fused_columns(self, modules: tuple[str, ...]) -> np.ndarray:
        """Column order of a fused weight (``modules``' outputs side by side in the model's order) stored
        shard-major: device i's block is its columns of each module in turn. Longer than the model's when
        KV heads are replicated."""
        offsets, off = {}, 0
        for m in modules:
            offsets[m] = off
            off += self.cfg.module_dims(m)[1]
        cols = [np.arange(s.start, s.stop) + offsets[m]
                for i in range(self.tp) for m in modules for s in [self.out_columns(m, i)]]
        return np.concatenate(cols).astype(np.int32)

    def unfused_columns(self, modules: tuple[str, ...]) -> np.ndarray:
        """Where each column of the model's fused order lies in the shard-major order (its first copy)."""
        order = self.fused_columns(modules)
        total = sum(self.cfg.module_dims(m)[1] for m in modules)
        first = np.full(total, -1, np.int64)
        for pos in range(len(order) - 1, -1, -1):
            first[order[pos]] = pos
        assert (first >= 0).all()
        return first.astype(np.int32)

    def lora_slices(self, module: str, i: int) -> tuple[slice, slice]:
        """(columns of A^T [r, d_in], columns of B [r, d_out]) that device ``i`` holds of a LoRA on
        ``module``: all of A and its own outputs of B for column-parallel projections, its own inputs of A
        and all of B for row-parallel ones."""
        return self.in_columns(module, i), self.out_columns(module, i)


def shard_decoder(fn: Callable, mesh, in_specs, out_specs) -> Callable:
    """``fn`` run on every device of ``mesh`` with its local blocks (``shard_map``). Replication is not
    type-checked: the Pallas calls inside carry no such types, and the code places its own all-reduces."""
    import jax

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is not None:
        return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # older jax

    return legacy(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def all_reduce(x, tp: int, axis: Optional[str] = MODEL_AXIS):
    """Sum ``x`` over the model axis (inside ``shard_decoder``); nothing to do on one device."""
    if tp == 1:
        return x
    import jax

    return jax.lax.psum(x, axis)
