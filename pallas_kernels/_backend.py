"""Backend choice for every kernel: where Pallas runs, how it is lowered, and its compiler knobs.

This is the one module that knows the GPU lowering is Triton. Kernels import the masked
`load`/`store` and `compiler_params` from here, so moving to another lowering (Mosaic GPU) is a
change in this file and the kernels' bodies, not in every caller.

The Triton lowering has no scalar prefetch and no dynamic grid: index tables are ordinary inputs
read with scalar loads, and grids are sized from static shapes.
"""

from __future__ import annotations

import warnings
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

with warnings.catch_warnings():
    # The Triton lowering is deprecated from jax 0.11 on but still the working GPU path there.
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as _pltriton

    _CompilerParams = _pltriton.CompilerParams
    load = _pltriton.load  # load(ref_view, *, mask=None, other=None) -> array
    store = _pltriton.store  # store(ref_view, value, *, mask=None)

from pallas_kernels._errors import KernelInputError

IMPLEMENTATIONS = ("xla", "pallas")


def on_gpu() -> bool:
    """True when the default JAX backend is a GPU (where Pallas kernels are compiled)."""
    return jax.default_backend() == "gpu"


def interpret_mode() -> bool:
    """Pallas kernels run in interpret mode everywhere but on a GPU."""
    return not on_gpu()


def compiler_params(num_warps: int = 4, num_stages: int = 2):
    """Compiler parameters for one `pallas_call` under the current GPU lowering."""
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def resolve(implementation: Optional[str], op: str, unsupported: Optional[str] = None) -> str:
    """Pick the backend of one call.

    None means "pallas" on a GPU and "xla" elsewhere; when the Pallas kernel cannot take these
    shapes (`unsupported` says why), None falls back to "xla" and an explicit "pallas" raises.
    """
    if implementation is None:
        if on_gpu() and unsupported is None:
            return "pallas"
        return "xla"
    if implementation not in IMPLEMENTATIONS:
        raise KernelInputError(f"{op}: implementation must be None, 'xla' or 'pallas', got {implementation!r}")
    if implementation == "pallas" and unsupported is not None:
        raise KernelInputError(f"{op}: the Pallas kernel does not support these inputs: {unsupported}")
    return implementation


def _varying_axes(x) -> frozenset:
    """Manual mesh axes x varies over inside a `jax.shard_map` with check_vma (empty elsewhere)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is not None:
        return frozenset(vma)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def kernel_operands(*arrays):
    """Make all operands of one `pallas_call` vary over the same manual mesh axes.

    Under `jax.shard_map` (check_vma=True) a kernel's operands must agree on which mesh axes they
    vary over; replicated ones (the pool, tables) are cast to varying, a type-only change with
    no data movement. Outside shard_map this returns the arrays unchanged.
    """
    axes = frozenset().union(*(_varying_axes(a) for a in arrays))
    if not axes:
        return arrays
    out = []
    for a in arrays:
        missing = tuple(sorted(axes - _varying_axes(a)))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return tuple(out)


def output_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """A `pallas_call` out_shape that varies over the same manual mesh axes as operand `like`."""
    return jax.eval_shape(lambda a: jax.numpy.zeros(shape, dtype) + jax.numpy.sum(a).astype(dtype) * 0, like)


def update_in_place(kernel, *operands, grid, num_warps: int, interpret: bool, name: str, num_stages: int = 2):
    """Run `kernel` over `grid` as a `pallas_call` that updates its last operand in place: the output has
    that operand's shape and dtype and aliases it (no copy when the caller donates it). Every operand is
    passed whole (`no_block_spec`): the kernels gather through index tables, which this lowering's block
    specs cannot express."""
    args = kernel_operands(*operands)
    target = args[-1]
    return pl.pallas_call(
        kernel,
        out_shape=output_struct(target.shape, target.dtype, target),
        grid=grid,
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.no_block_spec,
        input_output_aliases={len(args) - 1: 0},
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*args)


def column_mask(start, width: int, limit, exact: bool):
    """[width] mask of the columns start + i < limit of one block.

    exact=False when the caller knows statically that every block lies wholly inside or wholly outside
    the limit (sizes that are multiples of the block): the mask is then one predicate broadcast over the
    block. Triton vectorises a load only along runs where its mask is constant, and a per-column compare
    against a bound known only at run time (a table entry) has no such runs, which turned the LoRA
    kernels' loads and stores of weights and outputs into one element per instruction.
    """
    if exact:
        return (start + jnp.arange(width)) < limit
    return jnp.broadcast_to(start < limit, (width,))
