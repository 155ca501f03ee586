"""Each LoRA case run once through the public Pallas ops, for a hardware-counter profiler to read.

    ncu --clock-control none -k regex:lora --section SpeedOfLight --section Occupancy ... \\
        python3 benchmarks/kernel_ncu.py --cases decode:256:256:16,decode:256:1:16:kernel,prefill:8192:64:64

A case is op:T:adapters:rank[:grouping] (decode: a grouping, or a variant of kernels.py's names such as
"none+lb0", the kernels called with those knobs) on the q/k/v GQA shape of benchmarks/kernels.py (hidden 4096, outputs
4096/1024/1024, 1024-column pages), bf16, inputs as kernels.py makes them (prefill tokens sorted by adapter).
Each op is compiled and run once, then checked against the XLA path (so a profile is of kernels that give the
right answer); the timing comes from the profiler, not from here.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as kb  # noqa: E402  (lora_inputs: the sweep's own cases)

import pallas_kernels as pk  # noqa: E402
from pallas_kernels.ops.lora_decode import pallas_triton  # noqa: E402
from pallas_kernels.ops.lora_layout import validate_lora_args  # noqa: E402

H, OUTS, W = 4096, (4096, 1024, 1024), 1024


def run(op: str, T: int, distinct: int, rank: int, grouping: str | None) -> float:
    rng = np.random.default_rng(T * 1000 + distinct)
    y, consts, _, _ = kb.lora_inputs(rng, jax.random.PRNGKey(distinct), T=T, distinct=distinct, rank=rank, d_in=H,
                                     out_sizes=OUTS, W=W, dtype=jnp.bfloat16, sorted_slots=op == "prefill")
    fn = pk.lora_decode if op == "decode" else pk.lora_prefill
    kw = dict(grouping=grouping) if (op == "decode" and grouping) else {}
    if op == "decode" and grouping and "+" in grouping:  # a variant: the kernels with knobs (kernels.py's names)
        dims = validate_lora_args(op, y, *consts[:7], consts[7], OUTS)
        kn = kb.lora_variant_kwargs(op, grouping, dims)

        def fn(y, *k, out_sizes, implementation):
            if implementation == "xla":
                return pk.lora_decode(y, *k, out_sizes=out_sizes, implementation="xla")
            return pallas_triton.lora_decode_pallas(y, *k, dims=dims, interpret=pk._backend.interpret_mode(), **kn)
        kw = {}
    if op == "prefill":  # the engine's call: slots in runs, the tile list made once
        kw = dict(slots_in_runs=True, tiles=pk.lora_prefill_tiles(consts[7], consts[3].shape[0]))
    out = jax.jit(lambda y, *k: fn(y, *k[:7], k[7], out_sizes=OUTS, implementation="pallas", **kw))(y, *consts)
    ref = jax.jit(lambda y, *k: fn(y, *k[:7], k[7], out_sizes=OUTS, implementation="xla"))(y, *consts)
    d = (out.astype(jnp.float32) - ref.astype(jnp.float32))
    r = (ref.astype(jnp.float32) - y.astype(jnp.float32))
    return float(jnp.linalg.norm(d) / jnp.maximum(jnp.linalg.norm(r), 1e-30))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", required=True)
    args = p.parse_args(argv)
    for case in args.cases.split(","):
        op, T, d, r, *g = case.split(":")
        err = run(op, int(T), int(d), int(r), g[0] if g else None)
        print(f"{case}: relative error against XLA {err:.1e}", flush=True)
        if err > 2e-2:
            raise SystemExit(f"{case}: relative error {err:.1e}")
    return 0


if __name__ == "__main__":
    rc = main()
    # Under ncu on the H200 (2026-12-01) the process crashed after its kernels were profiled, and ncu then
    # printed nothing: leave without the interpreter's teardown.
    sys.stdout.flush()
    os._exit(rc)
