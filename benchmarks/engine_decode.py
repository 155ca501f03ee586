"""Decode step time of the engine at real model shape: with adapters vs the same engine without.

    python benchmarks/engine_decode.py --model llama-2-7b --adapters 100 --batches 1,32,128,256 \
        --backends xla,pallas --out results.json

Random weights (bf16) made on the device; ``--adapters`` random LoRA adapters of ranks 8/16/32/64 (``--ranks``) on
q/k/v/o, registered from memory. For each batch size and backend: B requests are prefilled, then
``--steps`` decode steps are timed through ``engine.step()`` (host scheduling included) for
(a) every request on its own adapter (up to ``--adapters`` distinct) and (b) no adapter at all.
Each time is set against its memory floor: (weights + KV read + distinct adapters' bytes) / copy
bandwidth measured in the same run (`bandwidth.measure_copy_bandwidth`: the fastest of several
copies, beside the HBM peak). Through the public Engine API only (that the pool is updated in place is
checked on the compiled programs by tests/engine/test_engine.py::test_pool_updated_in_place).
Prints a table last and writes JSON (device, jax version, date, command, numbers).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import slora_jax as sj
from slora_jax.adapters.synthetic import random_lora
from slora_jax.bench.setup import resolve_model
from slora_jax.model.init import random_params
from pallas_kernels.ops.lora_decode import pallas_triton as lora_decode_triton

# The scripts here import their shared helpers as siblings (they are run as `python benchmarks/<name>.py`).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bandwidth import measure_copy_bandwidth  # noqa: E402

RANKS = (8, 16, 32, 64)
SMALL_BATCH_TOKENS = lora_decode_triton.SMALL_BATCH_TOKENS
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def param_bytes(tree) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)))


def run_batch(engine, B: int, prompt_len: int, steps: int, adapters: list, rng) -> dict:
    sp = sj.SamplingParams(max_tokens=10_000, ignore_eos=True)
    ids = [engine.add_request(rng.integers(3, engine.model_config.vocab_size - 1, prompt_len).tolist(),
                              adapter=adapters[i % len(adapters)] if adapters else None, sampling=sp)
           for i in range(B)]
    t0 = time.perf_counter()
    while engine.stats()["running"] < B or engine.stats()["waiting"]:
        engine.step()
    prefill_s = time.perf_counter() - t0
    for _ in range(3):  # compile + warm the decode program of this shape
        engine.step()
    s0 = engine.stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = (time.perf_counter() - t0) / steps
    s1 = engine.stats()
    host = (s1["host_time_s"] - s0["host_time_s"]) / steps
    # Per-step host time by part; "launch" is the call of the compiled step. With async scheduling the
    # next step is launched while the previous one runs, so a launch that waits on the device shows here.
    parts = {k: (s1[group][k] - s0[group][k]) / steps
             for group in ("host_breakdown_s", "dispatch_breakdown_s") for k in s1[group]}
    ctx = prompt_len + 3 + steps // 2  # average context during the timed steps
    for rid in ids:
        engine.abort(rid)
    engine.step()
    return dict(step_s=dt, host_s=host, host_parts_s=parts, tokens_per_s=B / dt, prefill_s=prefill_s, avg_ctx=ctx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-7b", help="named shape (llama-2-7b, llama-3-8b, ...) or 'tiny'")
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--batches", default="1,32,128,256")
    ap.add_argument("--backends", default="xla,pallas",
                    help="comma list of kernel backends with variants: '+unroll' / '+scan' the layers (default: "
                         "unrolled on GPU), '+sync' reads each decode step before queuing the next "
                         "(e.g. pallas,pallas+sync,xla+scan); '+nosmall' gives MBGMV its large-batch knobs at every "
                         "batch size (pallas_triton.SMALL_BATCH_TOKENS = 0), to time the small-batch ones against; "
                         "'+notiles' keeps decode steps off MBGMV's tile kernels (lora_decode_tiles=False); "
                         "'+deadblocks' gives MBGMV's per-chunk expand its former loop over every rank block "
                         "(pallas_triton.LIVE_RANK_BLOCKS = False); '+noone' compiles no one-rank-block programs "
                         "(lora_one_block_programs=False)")
    ap.add_argument("--ranks", default=",".join(str(r) for r in RANKS),
                    help="the adapters' ranks, cycled over them (all <= 16: every step fits one rank block)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-pages", type=int, default=None,
                    help="pool pages (default: --memory-fraction of the free device memory)")
    # At 0.85 (the engine's default) the 4096-token prefill step ran out of memory on the H200: an 8.5 GiB
    # workspace of lora_prefill's former XLA branch. That branch is gone; 0.6 stays until a GPU run shows it.
    ap.add_argument("--memory-fraction", type=float, default=0.6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    cfg = resolve_model(args.model)[0]
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(42)
    bandwidth = measure_copy_bandwidth(64 << 20 if args.model == "tiny" else 2 << 30)
    bw = bandwidth.bytes_per_s
    print(bandwidth.describe(), flush=True)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    t0 = time.perf_counter()
    params = random_params(cfg, dtype, seed=0)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    wbytes = param_bytes(params)
    ranks = [int(r) for r in args.ranks.split(",")]
    loras = [random_lora(cfg, r, TARGETS, seed=r, name=f"r{r}") for r in ranks]
    results = {"device": str(dev.device_kind), "platform": dev.platform, "jax": jax.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["python", "benchmarks/engine_decode.py"] + (argv or sys.argv[1:])),
               "model": cfg.name, "dtype": args.dtype, "copy_bandwidth_Bps": bw, **bandwidth.as_dict(),
               "weight_bytes": wbytes,
               "random_init_s": init_s, "adapters": args.adapters, "ranks": ranks, "targets": list(TARGETS),
               "cases": []}
    itemsize = jnp.dtype(dtype).itemsize
    for k, backend in enumerate(args.backends.split(",")):
        kernel_backend, *variants = backend.split("+")
        lora_decode_triton.SMALL_BATCH_TOKENS = 0 if "nosmall" in variants else SMALL_BATCH_TOKENS
        lora_decode_triton.LIVE_RANK_BLOCKS = "deadblocks" not in variants
        jax.clear_caches()  # the kernels read it when traced: no trace of the previous engine's may be reused
        engine = sj.Engine(cfg, params, sj.EngineConfig(
            dtype=args.dtype, kernel_backend=kernel_backend,
            scan_layers=False if "unroll" in variants else (True if "scan" in variants else None),
            async_scheduling="sync" not in variants, lora_decode_tiles="notiles" not in variants,
            lora_one_block_programs="noone" not in variants,
            max_batch_size=max(batches),
            max_adapters_on_device=max(args.adapters, 1), max_prefill_tokens=4096, prefetch=False,
            num_pages=args.num_pages, memory_fraction=args.memory_fraction))
        names = []
        for i in range(args.adapters):
            names.append(f"ad{i}")
            engine.load_adapter_weights(names[-1], loras[i % len(loras)])
        for B in batches:
            for mode in ("lora", "base"):
                use = names[:min(B, len(names))] if mode == "lora" else []
                r = run_batch(engine, B, args.prompt_len, args.steps, use, rng)
                kv_read = B * r["avg_ctx"] * cfg.num_layers * 2 * cfg.kv_size * itemsize
                ad_bytes = 0
                for i in range(len(use)):
                    rank = ranks[i % len(ranks)]
                    ad_bytes += cfg.num_layers * rank * 2 * (2 * cfg.hidden_size + 2 * cfg.kv_size) * itemsize
                floor = (wbytes + kv_read + ad_bytes) / bw
                r.update(backend=backend, engine=k, batch=B, mode=mode, distinct_adapters=len(use),
                         kv_read_bytes=kv_read,
                         adapter_bytes=ad_bytes, floor_s=floor, floor_frac=floor / r["step_s"])
                results["cases"].append(r)
                print(f"[{backend}] B={B:<4} {mode:<5} step {r['step_s'] * 1e3:8.2f} ms  floor "
                      f"{floor * 1e3:7.2f} ms  host {r['host_s'] / r['step_s']:.0%}  launch "
                      f"{r['host_parts_s']['launch'] * 1e3:.2f} ms", flush=True)
        results.setdefault("stats", {})[backend] = {k: v for k, v in engine.stats().items()
                                                    if isinstance(v, (int, float, str))}
        engine.close()  # its pool goes before the next engine sizes its own from the free memory
        del engine
        gc.collect()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; weights {wbytes / 1e9:.2f} GB; {cfg.name} {args.dtype}")
    print(f"{'backend':<8}{'B':>5}{'lora ms':>10}{'base ms':>10}{'floor ms':>10}{'lora/base tok/s':>17}"
          f"{'%floor':>8}{'host%':>7}")
    # Keyed by the engine's place in --backends: a backend named twice (a repeat) keeps both rows.
    by = {(c["engine"], c["batch"], c["mode"]): c for c in results["cases"]}
    for k, backend in enumerate(args.backends.split(",")):
        for B in batches:
            lo, ba = by[(k, B, "lora")], by[(k, B, "base")]
            print(f"{backend:<8}{B:>5}{lo['step_s'] * 1e3:>10.2f}{ba['step_s'] * 1e3:>10.2f}"
                  f"{lo['floor_s'] * 1e3:>10.2f}{lo['tokens_per_s'] / ba['tokens_per_s']:>17.3f}"
                  f"{lo['floor_frac']:>8.0%}{lo['host_s'] / lo['step_s']:>7.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
