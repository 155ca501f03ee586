"""The device's copy bandwidth, measured the way the hardware agrees with: the best of several copies.

    from bandwidth import measure_copy_bandwidth          # benchmarks/ is on sys.path for its scripts
    bw = measure_copy_bandwidth()                         # bw.bytes_per_s, bw.method, bw.candidates
    python benchmarks/bandwidth.py [--gib 2]              # prints every candidate and the reference

Why several: on the H200 jax's `x + 1` over 2 GiB bf16 moved 3.3 TB/s while torch's moved 4.26 TB/s on the
same GPU the same day (2026-11-30), so one XLA elementwise op understates what a kernel can reach, and floors
set by it make kernels look ~1.3x closer to the roofline than they are. Every candidate here reads N bytes
and writes N bytes per call; the reference is the fastest of them (bytes read + written per second), reported
beside the HBM datasheet peak (4.8 TB/s on the H200) so a reader sees both.

Candidates (each timed inside one jitted `lax.fori_loop` whose carry is the whole output, best of 3 loops):
  pallas_copy_bf16   a Pallas copy kernel (GPU only): 1-D blocks of 16K bf16 elements, 8 warps;
  pallas_copy_u32    the same kernel over the buffer viewed as uint32 (wider elements per thread);
  xla_add_bf16       jax's `x + 1` on the flat bf16 buffer (the former reference);
  xla_add_bf16_2d    the same on [N / 8192, 8192] (XLA's launch shape differs with the rank);
  xla_add_u32        `x + 1` on the buffer viewed as uint32.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

HBM_PEAK_BYTES_PER_S = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}

_COPY_BLOCK = 16384  # elements per program: 32 KiB of bf16, 64 KiB of uint32
_COPY_WARPS = 8


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    """A measured copy bandwidth: bytes read + written per second by the fastest candidate."""

    bytes_per_s: float
    method: str  # the candidate that set it
    candidates: dict  # name -> bytes/s (inf-free; failures are left out and listed in `failed`)
    nbytes: int  # bytes of the buffer each candidate read (and wrote)
    hbm_peak_bytes_per_s: float | None  # datasheet peak of this device, when known
    failed: dict = dataclasses.field(default_factory=dict)  # name -> error text

    def as_dict(self) -> dict:
        """JSON-ready summary for benchmark reports."""
        peak = self.hbm_peak_bytes_per_s
        return dict(copy_bandwidth_GBps=self.bytes_per_s / 1e9, copy_bandwidth_method=self.method,
                    copy_bandwidth_candidates_GBps={k: v / 1e9 for k, v in self.candidates.items()},
                    copy_bandwidth_failed=self.failed, copy_bandwidth_buffer_bytes=self.nbytes,
                    hbm_peak_GBps=None if peak is None else peak / 1e9,
                    copy_fraction_of_hbm_peak=None if peak is None else self.bytes_per_s / peak)

    def describe(self) -> str:
        peak = self.hbm_peak_bytes_per_s
        shown = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in sorted(self.candidates.items(), key=lambda kv: -kv[1]))
        tail = f"; HBM peak {peak / 1e9:.0f} GB/s ({self.bytes_per_s / peak:.0%} of it)" if peak else ""
        return (f"copy bandwidth {self.bytes_per_s / 1e9:.0f} GB/s (read + write, best of: {shown} GB/s; "
                f"set by {self.method}){tail}")


def _pallas_copy(x, *, interpret: bool):
    """out = x through a Pallas kernel: one program per _COPY_BLOCK elements (the size must divide)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the Triton lowering is deprecated from jax 0.11 on
        from jax.experimental.pallas import triton as pltriton

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    n = x.shape[0]
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(n // _COPY_BLOCK,),
        in_specs=[pl.BlockSpec((_COPY_BLOCK,), lambda i: (i,))],
        out_specs=pl.BlockSpec((_COPY_BLOCK,), lambda i: (i,)),
        compiler_params=pltriton.CompilerParams(num_warps=_COPY_WARPS, num_stages=1),
        interpret=interpret,
        name="copy_bandwidth",
    )(x)


def _loop_seconds(step, x, target_s: float) -> float:
    """Seconds per step(x) inside one jitted fori_loop of n steps (the carry is the whole output), best of 3."""

    @functools.partial(jax.jit, donate_argnums=0)
    def loop(c, n):
        return lax.fori_loop(0, n, lambda _, c: step(c), c)

    x = jax.block_until_ready(loop(x, 1))  # compile + warm up
    t0 = time.perf_counter()
    x = jax.block_until_ready(loop(x, 2))
    est = (time.perf_counter() - t0) / 2
    n = int(min(1000, max(2, target_s / max(est, 1e-7))))
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        x = jax.block_until_ready(loop(x, n))
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _candidates(nbytes: int, with_pallas: bool, interpret: bool):
    n16 = nbytes // 2
    n32 = nbytes // 4
    out = {
        "xla_add_bf16": (lambda c: c + 1, lambda: jnp.zeros((n16,), jnp.bfloat16)),
        "xla_add_bf16_2d": (lambda c: c + 1, lambda: jnp.zeros((n16 // 8192, 8192), jnp.bfloat16)),
        "xla_add_u32": (lambda c: c + 1, lambda: jnp.zeros((n32,), jnp.uint32)),
    }
    if with_pallas:
        out["pallas_copy_bf16"] = (functools.partial(_pallas_copy, interpret=interpret),
                                   lambda: jnp.zeros((n16,), jnp.bfloat16))
        out["pallas_copy_u32"] = (functools.partial(_pallas_copy, interpret=interpret),
                                  lambda: jnp.zeros((n32,), jnp.uint32))
    return out


def measure_copy_bandwidth(nbytes: int = 2 << 30, target_s: float = 0.05, with_pallas: bool | None = None,
                           device=None) -> Bandwidth:
    """Bytes read + written per second by the fastest of several copies of an nbytes buffer.

    nbytes: buffer size; several times the L2 (a few GiB on a GPU) so that the copy streams from HBM. It is
      rounded down to a multiple of 64 KiB (whole rows and blocks of every candidate).
    with_pallas: include the Pallas copy kernels (default: only on a GPU; interpret mode on a CPU measures
      the interpreter, not memory).
    A candidate that fails (e.g. a lowering missing on this jax) is left out and named in `failed`; if every
    candidate fails, this raises.
    """
    device = device or jax.devices()[0]
    on_gpu = device.platform == "gpu"
    with_pallas = on_gpu if with_pallas is None else with_pallas
    unit = 4 * max(8192, _COPY_BLOCK)  # whole rows of the 2-D view and whole Pallas blocks, in uint32 too
    nbytes = max(unit, nbytes // unit * unit)
    measured, failed = {}, {}
    with jax.default_device(device):
        for name, (step, make) in _candidates(nbytes, with_pallas, interpret=not on_gpu).items():
            try:
                measured[name] = 2 * nbytes / _loop_seconds(step, make(), target_s)
            except Exception as e:  # one missing lowering must not cost the others
                failed[name] = f"{type(e).__name__}: {e}"[:500]
    if not measured:
        raise RuntimeError(f"every copy candidate failed: {failed}")
    best = max(measured, key=measured.get)
    return Bandwidth(bytes_per_s=measured[best], method=best, candidates=measured, nbytes=nbytes,
                     hbm_peak_bytes_per_s=HBM_PEAK_BYTES_PER_S.get(device.device_kind), failed=failed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=2.0, help="buffer size in GiB")
    p.add_argument("--pallas", choices=["auto", "on", "off"], default="auto")
    args = p.parse_args(argv)
    bw = measure_copy_bandwidth(int(args.gib * (1 << 30)), with_pallas={"auto": None, "on": True, "off": False}[
        args.pallas])
    print(bw.describe())
    for name, err in bw.failed.items():
        print(f"  {name} failed: {err}")


if __name__ == "__main__":
    main()
