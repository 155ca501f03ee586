"""MBGMV / MBGMM cases timed side by side and then traced: where each call's device time goes, kernel by kernel.

    python3 benchmarks/kernel_profile.py --out $OUT/kernel-profile.json [--trace-dir /tmp/kp]

Each case (q/k/v GQA of benchmarks/kernels.py: hidden 4096, outputs 4096/1024/1024, 1024-column pages, bf16) runs
its variants through the sweep's own timing loop (8 calls per iteration, optimization barriers between calls),
after a check against the XLA path. Then each (case, variant) runs 20 iterations under jax.profiler, and the
trace's compute-stream kernels give, per call: each kernel's mean device time, the time the stream was busy, and
the call's span (first kernel start to last kernel end, over the iterations, divided by the calls). The copy
bandwidth of the same run (`bandwidth.measure_copy_bandwidth`) sets each case's floor.

Variants: "default" (lora_decode / lora_prefill as the engine calls them), or a decode grouping with knobs as in
kernels.py (e.g. "tiles", "tiles+ks16", "kernel"); "tiles@plan" runs the tile kernels on a plan computed outside
the timed call (the plan depends on the slot table only: a step computes it once for all layers and groups), and
"plan" times that plan alone.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as kb  # noqa: E402  (lora_inputs, in_loop_seconds, relative_error: the sweep's own)
from bandwidth import measure_copy_bandwidth  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels.ops.lora_decode import tiles_triton  # noqa: E402
from pallas_kernels.ops.lora_layout import validate_lora_args  # noqa: E402
from pallas_kernels.testing import relative_error  # noqa: E402
from slora_jax.bench.timeline import compute_kernels  # noqa: E402

H, OUTS, W = 4096, (4096, 1024, 1024), 1024

# (op, T, adapters, rank, variants)
CASES = [
    ("decode", 256, 256, 16, ("default", "none+cap1", "default", "none+cap1", "none+cap2")),
    ("decode", 256, 256, 64, ("default", "none+cap4")),
    ("decode", 8, 1, 16, ("default", "none+cap1")),
]


def _knobs(variant: str) -> dict:
    kw = {}
    for part in variant.split("+")[1:]:
        name, num = part.rstrip("0123456789"), int(part[len(part.rstrip("0123456789")):])
        kw[{"ks": "k_splits", "bn": "block_n", "bk": "block_k", "w": "num_warps",
            "lb": "live_blocks", "st": "num_stages", "ew": "expand_warps", "mf": "module_fastest", "cap": "rank_cap",
            "tm": "block_tokens", "pm": "shrink_per_module",
            "pc": "expand_per_chunk", "ya": "y_align_hint"}[name]] = num
    return kw


def steps(op, variant, dims, consts):
    """(step(carry, consts) -> carry, consts) of one variant; consts may gain the precomputed plan."""
    slot = consts[7]
    head = variant.split("+")[0]
    interpret = not pk._backend.on_gpu()
    if variant == "default":
        fn = pk.lora_decode if op == "decode" else pk.lora_prefill
        kw = dict(slots_in_runs=True) if op == "prefill" else {}
        return (lambda c, k: fn(c, *k[:7], k[7], out_sizes=OUTS, implementation="pallas", **kw)), consts
    if variant == "plan":
        def plan_step(c, k):
            rows = tiles_triton.tile_plan(k[7], dims.num_slots)[0]
            return c + (jnp.sum(rows) == -1).astype(c.dtype)  # the carry depends on the plan (never true)
        return plan_step, consts[:7] + (slot,)
    if op == "prefill" and head in ("list", "kernel"):
        # The tile list computed once outside the calls, as the engine's step does (`lora_prefill_tiles`).
        kw = _knobs(variant)
        tm = kw.pop("block_tokens", 64)
        tl = jax.jit(functools.partial(pk.lora_prefill_tiles, num_slots=dims.num_slots, block_tokens=tm))(slot)
        if head == "list":
            return (lambda c, k: pk.lora_prefill(c, *k[:7], k[7], out_sizes=OUTS, implementation="pallas",
                                                 block_tokens=tm, slots_in_runs=True, tiles=k[8])), consts[:8] + (tl,)
        nt = tl[0].shape[0]
        return (lambda c, k: pk.ops.lora_prefill.pallas_triton.lora_prefill_pallas(
            c, *k[:7], k[8], dims=dims, interpret=interpret, num_tiles=nt, block_tokens=tm, **kw)), consts[:8] + (tl,)
    if head == "tiles@plan":
        plan = jax.jit(functools.partial(tiles_triton.tile_plan, num_slots=dims.num_slots))(slot)
        kw = _knobs(variant)
        return (lambda c, k: tiles_triton.lora_decode_tiles(c, *k[:8], plan=k[8], dims=dims, interpret=interpret,
                                                            **kw)), consts[:7] + (slot, plan)
    kw = dict(_knobs(variant), grouping=head)
    cap = kw.pop("rank_cap", None)
    if cap:  # the page tables cut to `cap` rank blocks: valid when no adapter's rank needs more (the case's do not)
        consts = consts[:3] + (consts[3][..., :cap], consts[4][..., :cap]) + consts[5:]
        dims = validate_lora_args(op, jnp.zeros((dims.num_tokens, sum(OUTS)), jnp.bfloat16), *consts[:7], consts[7],
                                  OUTS)
    return (lambda c, k: pk.ops.lora_decode.pallas_triton.lora_decode_pallas(
        c, *k[:7], k[7], dims=dims, interpret=interpret, **kw)), consts[:7] + (slot,)


def profile(step, y, consts, trace_dir, iters=20):
    """Per call: {kernel: mean us}, busy us, span us, from a trace of `iters` loop iterations of 8 calls."""
    calls = kb.CALLS_PER_ITERATION

    def body(_, c, k):
        c, k = lax.optimization_barrier((c, k))
        for _ in range(calls):
            c, k = lax.optimization_barrier((step(c, k), k))
        return c

    loop = jax.jit(lambda c, k, n: lax.fori_loop(0, n, functools.partial(body, k=k), c), donate_argnums=0)
    c = jax.block_until_ready(loop(y + 0, consts, 2))
    for f in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        os.remove(f)
    jax.profiler.start_trace(trace_dir)
    try:
        jax.block_until_ready(loop(c, consts, iters))
    finally:
        jax.profiler.stop_trace()
    files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
    data = jax.profiler.ProfileData.from_file(files[-1])
    ks = []
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            ks.extend(compute_kernels(plane))
    ks.sort()
    n = iters * calls
    per = {}
    for start, stop, name in ks:
        key = name.split("(")[0][:60]
        per[key] = per.get(key, 0.0) + (stop - start) / 1e3 / n
    busy = sum(per.values())
    span = (max(e for _, e, _ in ks) - ks[0][0]) / 1e3 / n if ks else 0.0
    return dict(kernels_us={k: round(v, 3) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
                busy_us=busy, span_us=span, kernels_per_call=len(ks) / n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="kernel-profile.json")
    p.add_argument("--trace-dir", default="/tmp/kernel-profile")
    p.add_argument("--target-s", type=float, default=0.2)
    p.add_argument("--cases", default=None, help="indices into CASES, comma list (default: all)")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args(argv)
    kb.CALLS_PER_ITERATION = 8
    bw = measure_copy_bandwidth()
    print(bw.describe(), flush=True)
    rng = np.random.default_rng(0)
    results = []
    pick = [int(i) for i in args.cases.split(",")] if args.cases else range(len(CASES))
    for idx in pick:
        op, T, S, r, variants = CASES[idx]
        y, consts, nbytes, flops = kb.lora_inputs(rng, jax.random.key(idx), T=T, distinct=S, rank=r, d_in=H,
                                                  out_sizes=OUTS, W=W, dtype=jnp.bfloat16,
                                                  sorted_slots=op == "prefill")
        dims = validate_lora_args(op, y, *consts[:7], consts[7], OUTS)
        floor_us = nbytes / bw.bytes_per_s * 1e6
        ref = jax.jit(lambda y, *k: (pk.lora_decode if op == "decode" else pk.lora_prefill)(
            y, *k[:7], k[7], out_sizes=OUTS, implementation="xla"))(y, *consts)
        row = dict(op=op, T=T, adapters=S, rank=r, bytes=nbytes, floor_us=floor_us, variants={})
        for v in variants:
            rec = {}
            try:
                step, k = steps(op, v, dims, consts)
                if v != "plan":
                    out = jax.jit(step)(y + 0, k)
                    rec["rel_err"] = float(relative_error(out, ref, base=y))
                sec, _ = kb.in_loop_seconds(step, y + 0, k, args.target_s)
                rec["us"] = sec * 1e6
                rec["pct_of_copy"] = 100 * floor_us / rec["us"] if v != "plan" else None
                if not args.no_profile:
                    rec["profile"] = profile(step, y, k, args.trace_dir)
            except Exception as e:  # one failing variant must not end the run
                traceback.print_exc()
                rec["error"] = f"{type(e).__name__}: {e}"[:1500]
            # A variant timed again in one case (a repeat) keeps every timing: "name", "name#2", ...
            key, n = v, 1
            while key in row["variants"]:
                n += 1
                key = f"{v}#{n}"
            row["variants"][key] = rec
            prof = rec.get("profile", {})
            print(f"{op} T={T} S={S} r={r} {v:18s} {rec.get('us', float('nan')):8.1f} us "
                  f"err {rec.get('rel_err', 0) or 0:.1e} busy {prof.get('busy_us', 0):.1f} span "
                  f"{prof.get('span_us', 0):.1f} {prof.get('kernels_us', rec.get('error', ''))}", flush=True)
        results.append(row)
    doc = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=" ".join(sys.argv), **bw.as_dict(), calls_per_iteration=kb.CALLS_PER_ITERATION, cases=results)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print("\ncase                        variant             us     % copy   busy us  span us")
    for row in results:
        for v, rec in row["variants"].items():
            prof = rec.get("profile", {})
            pct = rec.get("pct_of_copy")
            print(f"{row['op']:7s} T={row['T']:<5d} S={row['adapters']:<4d} r={row['rank']!s:<5} {v:18s} "
                  f"{rec.get('us', float('nan')):7.1f} {pct if pct is not None else float('nan'):7.1f} "
                  f"{prof.get('busy_us', float('nan')):8.1f} {prof.get('span_us', float('nan')):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
