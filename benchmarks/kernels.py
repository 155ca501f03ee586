"""Kernel benchmark: every Pallas kernel checked against its XLA reference and timed against it.

    python benchmarks/kernels.py --out $OUT/kernels.json [--quick] [--tune]
    python benchmarks/kernels.py --quick --cpu-smoke          # tiny shapes, interpret mode, CPU

First measures the device's copy bandwidth (`bandwidth.measure_copy_bandwidth`: the fastest of a Pallas
copy kernel and several XLA copies over 2 GiB, bytes read + written per second, reported beside the HBM
peak) and its bf16 matmul rate (8192^3). Then, per case, on fresh random data made on the device, both
backends are timed in-loop: a jitted `lax.fori_loop` of N iterations, each running the op
CALLS_PER_ITERATION times in a row, whose carry is the op's whole output fed back as its input (y
for LoRA, the pool for write_kv, the output as the next query for attention), so nothing can be
sliced away and dispatch is paid once (see `in_loop_seconds` for why several calls per iteration).
One call on the first input is the check: the Pallas output against the XLA reference's, with the
output poisoned (random y the op adds to; relative error ||pallas - xla|| / ||xla - y||). Reported per case:
time, bytes the op must move, FLOPs, floor = max(bytes / copy bandwidth, FLOPs / matmul rate),
% of copy bandwidth, speedup over XLA. Exit status 1 if any case failed or missed tolerance.
`--lora-parts` also times the LoRA ops' shrink and expand kernels apart; `--lora-decode-variants` and
`--lora-prefill-variants` time the Pallas kernels with other knobs beside their defaults.

Sweeps (--quick trims them to fit ~4 minutes; --budget-s stops starting new cases):
  lora_decode   T in {1,16,64,256,512} x distinct adapters {1,8,T} x ranks {8,16,32,64,mixed},
                H = 4096 with q/k/v fused (W = 1024 GQA and W = 4096 MHA), gate/up and down of
                MLP widths 11008 / 14336; page tables sized for rank 64 (RB = 4), as the engine does.
                --quick: one adapter shared by 256 tokens, 256 adapters, T = 1/2/4/8 on one adapter, 5
                adapters for 256 tokens, and a few wider shapes; each beside the per-token kernels
                (variant "none", the former default).
  lora_prefill  8192 tokens in 1/16/64 segments, rank 64, q/k/v: the XLA path is jax.lax.ragged_dot.
  paged_decode_attention  batch 32..256 x context 512..4096, 8 KV heads, D = 128, 32 query heads,
                pages at random; also jax's own pallas.ops.gpu.paged_attention when importable.
  prefill_attention, write_kv  a few shapes each.
Writes JSON (device, jax version, date, command, ceilings, per-case numbers), prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import pallas_kernels as pk

# The scripts here import their shared helpers as siblings (they are run as `python benchmarks/<name>.py`).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bandwidth import measure_copy_bandwidth  # noqa: E402
from pallas_kernels.ops.lora_decode import pallas_triton as lora_decode_triton
from pallas_kernels._checks import pow2_divisor
from pallas_kernels.ops.lora_layout import sanitize_slots, validate_lora_args
from pallas_kernels.ops.lora_prefill import pallas_triton as lora_prefill_triton
from pallas_kernels.ops.lora_prefill import tiles as lora_tiles
from pallas_kernels.ops.paged_decode_attention import layout as paged_layout
from pallas_kernels.ops.paged_decode_attention import pallas_triton as paged_triton
from pallas_kernels.testing import relative_error

R = 16  # page rows
H = 4096
MAX_RANK = 64


# ----------------------------------------------------------------------------------------------
# Timing


def replica_mesh(n: int):
    """A 1-D mesh over the first n local devices (0 = all of them), for --replicas."""
    devs = jax.local_devices()
    n = n or len(devs)
    if n > len(devs):
        raise SystemExit(f"--replicas {n}: this host has {len(devs)} local device(s)")
    return jax.sharding.Mesh(np.array(devs[:n]), ("replica",))


def on_replicas(step, carry, consts, mesh):
    """(step, carry, consts) for one independent copy of the case per device of ``mesh``: the kernels run
    under jax.shard_map, each device on its own replica of every input (the carry gets a leading replica
    axis, the constants are copied whole to each device)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = mesh.size
    devs = list(mesh.devices.flat)
    # Built per device: a pool-sized carry (write_kv) must not be stacked n times on one device first.
    carry = jax.make_array_from_single_device_arrays(
        (n,) + carry.shape, NamedSharding(mesh, P("replica")), [jax.device_put(carry[None], d) for d in devs])
    consts = jax.device_put(consts, NamedSharding(mesh, P()))
    # check_vma off: interpret-mode Pallas (the CPU) does not track varying mesh axes (see pallas_kernels).
    body = jax.shard_map(lambda c, k: step(c[0], k)[None], mesh=mesh, in_specs=(P("replica"), P()),
                         out_specs=P("replica"), check_vma=False)
    return body, carry, consts


# Calls of the op per iteration of the timing loop. One iteration of a jitted while loop costs ~23 us on the
# H200 (its trip test goes back to the host: `loop_overhead_us`, measured on 2026-11-28), as much as a small
# kernel, so the loop body runs the op this many times back to back, as the engine's unrolled layers do.
# Set once by main (--calls-per-iteration).
CALLS_PER_ITERATION = 8


def in_loop_seconds(step, carry, consts, target_s: float, keep_first: bool = False, mesh=None, calls=None):
    """Seconds per call of step(carry, consts) -> carry, timed inside one jitted fori_loop.

    Each iteration runs `calls` (default CALLS_PER_ITERATION) calls in a row, each one's output the next
    one's input. An optimization barrier over the carry and the constants between calls keeps XLA from
    fusing one call into the next and from computing once what calls share (a LoRA shrink reads only the
    constant x: without the barrier on the constants, 8 calls ran one shrink).
    mesh: run one replica per device of this mesh at once (the seconds are then those of all of them).
    Returns (seconds, step(carry) of one call if keep_first else None; [replicas, ...] with a mesh).
    """
    calls = calls or CALLS_PER_ITERATION
    if mesh is not None:
        step, carry, consts = on_replicas(step, carry, consts, mesh)

    def body(_, c, k):
        c, k = lax.optimization_barrier((c, k))  # nothing in the body is loop-invariant (no hoisting either)
        for _ in range(calls):
            c, k = lax.optimization_barrier((step(c, k), k))
        return c

    @functools.partial(jax.jit, donate_argnums=0)
    def loop(c, k, n):
        return lax.fori_loop(0, n, functools.partial(body, k=k), c)

    first = jax.block_until_ready(jax.jit(step)(carry, consts)) if keep_first else None
    carry = jax.block_until_ready(loop(carry, consts, 1))  # compile + warm up
    t0 = time.perf_counter()
    carry = jax.block_until_ready(loop(carry, consts, 3))
    est = (time.perf_counter() - t0) / 3
    n = int(min(5000, max(3, target_s / max(est, 1e-7))))
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(loop(carry, consts, n))
        best = min(best, (time.perf_counter() - t0) / n)
    return best / calls, first


def matmul_rate(n: int, target_s: float) -> float:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(jnp.bfloat16)
    return 2 * n**3 / in_loop_seconds(lambda c, k: (c @ k).astype(jnp.bfloat16), a, b, target_s)[0]


# ----------------------------------------------------------------------------------------------
# Inputs (made on the device: pools are gigabytes)


def random_pool(key, shape, dtype):
    """~N(0, 0.01) values: on the device for big arrays, through numpy for small ones (no compile)."""
    if math.prod(shape) < (1 << 24):
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        return jnp.asarray((np.random.default_rng(seed).standard_normal(shape) * 0.1).astype(jnp.dtype(dtype)))
    return _device_normal(key, shape, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _device_normal(key, shape, dtype):
    return (jax.random.normal(key, shape, jnp.float32) * 0.1).astype(dtype)


def lora_inputs(rng, key, *, T, distinct, rank, d_in, out_sizes, W, dtype, sorted_slots=False, L=2):
    """Pool, tables and activations of one LoRA case; `rank` an int or "mixed" (8/16/32/64 per slot)."""
    M, S, RB = len(out_sizes), distinct, MAX_RANK // R
    CHin = -(-d_in // W)
    CHout = max(-(-n // W) for n in out_sizes)
    slot_rank = (
        rng.choice([8, 16, 32, 64], S) if rank == "mixed" else np.full(S, rank)
    ).astype(np.int32)
    need = [(-(-int(r) // R)) for r in slot_rank]
    n_pages = sum(nb * M * CHin + nb * sum(-(-n // W) for n in out_sizes) for nb in need)
    P = n_pages + 8
    free = iter(rng.permutation(P))
    a_pages = rng.integers(0, P, (S, M, CHin, RB)).astype(np.int32)  # unused entries: any valid id
    b_pages = rng.integers(0, P, (S, M, CHout, RB)).astype(np.int32)
    for s in range(S):
        for m, d_out in enumerate(out_sizes):
            for j in range(need[s]):
                for c in range(CHin):
                    a_pages[s, m, c, j] = next(free)
                for c in range(-(-d_out // W)):
                    b_pages[s, m, c, j] = next(free)
    ranks = np.broadcast_to(slot_rank[:, None, None], (S, L, M)).copy()
    scales = np.full((S, L, M), 0.5, np.float32)
    if sorted_slots:
        token_slot = np.repeat(np.arange(S), -(-T // S))[:T].astype(np.int32)
    else:
        token_slot = rng.permutation(np.arange(T) % S).astype(np.int32)
    k1, k2, k3 = jax.random.split(key, 3)
    x = random_pool(k1, (T, d_in), dtype) * 10
    y = random_pool(k2, (T, sum(out_sizes)), dtype) * 10
    pool = random_pool(k3, (L, P, R, W), dtype)
    used = np.unique(token_slot)
    weight_elems = int(sum(slot_rank[s] * (M * d_in + sum(out_sizes)) for s in used))
    itemsize = jnp.dtype(dtype).itemsize
    nbytes = itemsize * (T * d_in + 2 * T * sum(out_sizes) + weight_elems)
    flops = 2 * int(sum(slot_rank[token_slot])) * (M * d_in + sum(out_sizes))
    consts = (x, pool, jnp.int32(L - 1), jnp.asarray(a_pages), jnp.asarray(b_pages), jnp.asarray(ranks),
              jnp.asarray(scales), jnp.asarray(token_slot))
    return y, consts, nbytes, flops


def paged_inputs(rng, key, *, B, ctx, nq, nkv, D, dtype, L=2):
    NB = ctx // R
    P = 2 * B * NB + 8
    pages = rng.permutation(P)[: 2 * B * NB].reshape(2, B, NB).astype(np.int32)
    k1, k2 = jax.random.split(key)
    pool = random_pool(k1, (L, P, R, nkv * D), dtype) * 10
    q = random_pool(k2, (B, nq, D), dtype) * 10
    lengths = np.full(B, ctx, np.int32)
    itemsize = jnp.dtype(dtype).itemsize
    nbytes = itemsize * (2 * B * ctx * nkv * D + 2 * B * nq * D)
    flops = 4 * B * ctx * nq * D
    consts = (pool, jnp.int32(L - 1), jnp.asarray(pages[0]), jnp.asarray(pages[1]), jnp.asarray(lengths))
    return q, consts, nbytes, flops


# ----------------------------------------------------------------------------------------------
# Cases


class Runner:
    def __init__(self, args, bw, mm):
        self.args, self.bw, self.mm = args, bw, mm
        self.results = []
        self.t_start = time.perf_counter()
        self.rng = np.random.default_rng(0)
        self.key = jax.random.key(0)
        self.mesh = replica_mesh(args.replicas) if args.replicas != 1 else None

    def next_key(self):
        self.key, k = jax.random.split(self.key)
        return k

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.t_start > self.args.budget_s

    def record(self, op, name, params, nbytes, flops, run):
        """run() -> dict of measurements; adds floors and ratios, catches failures per case."""
        row = dict(op=op, name=name, **params, bytes=int(nbytes), flops=int(flops))
        if self.args.ops and op not in self.args.ops:
            return
        if self.out_of_time():
            row["skipped"] = "time budget"
            self.results.append(row)
            return
        t0 = time.perf_counter()
        try:
            row.update(run())
            floor = max(nbytes / self.bw, flops / self.mm)
            row["floor_us"] = floor * 1e6
            for impl in [k[:-3] for k in list(row) if k.endswith("_us") and not k.startswith("part_")]:
                row[f"{impl}_pct_copy_bw"] = 100 * nbytes / self.bw / (row[f"{impl}_us"] * 1e-6)
            if "pallas_us" in row and "xla_us" in row:
                row["speedup_vs_xla"] = row["xla_us"] / row["pallas_us"]
            if row.get("replicas") and "pallas_us" in row:  # the bytes every replica moved, per second
                row["pallas_aggregate_GBps"] = row["replicas"] * nbytes / (row["pallas_us"] * 1e-6) / 1e9
            for v in [k[:-3] for k in list(row) if k.startswith("pallas_") and k.endswith("_us") and k != "pallas_us"
                      and "pallas_us" in row]:
                row[f"{v[len('pallas_'):]}_speedup_vs_pallas"] = row["pallas_us"] / row[f"{v}_us"]
        except Exception as e:  # one failing case must not end the run
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
        row["case_s"] = time.perf_counter() - t0
        self.results.append(row)
        print(_fmt_row(row), flush=True)

    def timed(self, step_of, carry, consts, base=None, variants=()):
        """Checks and times step_of(impl)(carry, consts) -> carry for both backends (and Pallas ``variants``).

        The check compares the backends' first outputs (the op applied once to the poisoned carry):
        relative error of each Pallas variant against XLA, measured from `base` (what the op adds to).
        """
        out, first, failed = {}, {}, []
        for impl in ("xla", "pallas", *variants):
            try:
                sec, first[impl] = in_loop_seconds(step_of(impl), carry + 0, consts, self.args.target_s,
                                                   keep_first=True, mesh=self.mesh)
            except Exception as e:  # a Pallas path that fails to lower must not hide the others' numbers
                if impl == "xla":
                    raise
                traceback.print_exc()
                failed.append(f"{impl}: {type(e).__name__}: {e}"[:1000])
                continue
            out[f"{impl}_us"] = 1e6 * sec
        if "pallas" in first:
            out["rel_err"] = relative_error(first["pallas"], first["xla"], base=base)  # every replica's output
        if self.mesh is not None:
            out["replicas"] = self.mesh.size
            # Replicas run the same op on the same inputs: any difference between them is a fault.
            out["replicas_differ"] = bool(any(np.any(np.asarray(f[i]) != np.asarray(f[0]))
                                              for f in first.values() for i in range(1, self.mesh.size)))
        for v in variants:
            if v in first:
                out[f"{v}_rel_err"] = relative_error(first[v], first["xla"], base=base)
        if failed:
            out["error"] = "; ".join(failed)
        return out


def lora_case(runner, op, *, T, distinct, rank, d_in, out_sizes, W, shape_name, dtype, sorted_slots=False,
              extra=None):
    rng, key = runner.rng, runner.next_key()
    params = dict(shape=shape_name, T=T, distinct=distinct, rank=rank, d_in=d_in, out_sizes=list(out_sizes), W=W)
    params.update(extra or {})

    def run():
        y, consts, _, _ = inputs
        fn = {"decode": pk.lora_decode, "prefill": pk.lora_prefill}[op]
        dims = validate_lora_args(op, y, *consts[:7], consts[7], out_sizes)

        def step_of(impl):
            if impl.startswith("pallas_"):  # a variant: the kernel called with its own knobs
                kernel = _lora_decode_step if op == "decode" else _lora_prefill_step
                kw = lora_variant_kwargs(op, impl[len("pallas_"):], dims)
                if op == "prefill":
                    kw["tiles"] = pk.lora_prefill_tiles(consts[7], dims.num_slots, kw.get("block_tokens", 64))
                return functools.partial(kernel, dims=dims, interpret=not pk._backend.on_gpu(), **kw)
            if op == "prefill" and impl == "pallas" and sorted_slots:
                # As the engine calls it: slots in runs, the tile list computed once for every call of a step.
                tl = pk.lora_prefill_tiles(consts[7], dims.num_slots)
                return lambda c, k: fn(c, *k[:7], k[7], out_sizes=out_sizes, implementation=impl, slots_in_runs=True,
                                       tiles=tl)
            return lambda c, k: fn(c, *k[:7], k[7], out_sizes=out_sizes, implementation=impl)

        names = runner.args.lora_decode_variants if op == "decode" else runner.args.lora_prefill_variants
        variants = tuple(f"pallas_{v}" for v in names.split(",") if v)
        out = runner.timed(step_of, y, consts, base=y, variants=variants)
        if runner.args.lora_parts:
            out.update(lora_parts(runner, op, y, consts, dims))
        return out

    inputs = lora_inputs(rng, key, T=T, distinct=distinct, rank=rank, d_in=d_in, out_sizes=out_sizes, W=W,
                         dtype=dtype, sorted_slots=sorted_slots)
    runner.record(f"lora_{op}", f"{shape_name} T={T} adapters={distinct} r={rank}", params, inputs[2], inputs[3], run)


# Variant names: knobs joined by "+", each a prefix and a number; a bare flag is on, a flag followed by 0 off.
_DECODE_KNOBS = {"fused": "fused", "lb": "live_blocks", "ks": "k_splits", "bk": "block_k",
                 "bn": "block_n", "w": "num_warps", "ec": "expand_per_chunk", "ew": "expand_warps",
                 "cm": "column_masks", "gs": "group_splits", "ss": "single_splits", "st": "num_stages"}
# Decode variant words that name a grouping of MBGMV (see lora_decode's `grouping`).
_DECODE_GROUPINGS = ("kernel", "sort", "runs", "tiles", "none")
_PREFILL_KNOBS = {"pm": "shrink_per_module", "ec": "expand_per_chunk", "cm": "column_masks", "tm": "block_tokens",
                  "bk": "block_k", "bn": "block_n", "w": "num_warps", "mf": "module_fastest", "ya": "y_align_hint",
                  "st": "num_stages"}


def lora_variant_kwargs(op: str, name: str, dims) -> dict:
    """Keyword arguments of the Pallas kernel for a variant name such as "none+ks2" (decode: kernel / sort /
    runs / tiles / none = MBGMV's grouping, none being the per-token kernels, tiles the tile kernels with their plan
    computed in the call; gsN / ssN = parts of d_in per group tile / per lone token; stN = the kernels' pipeline
    stages; fused, ksN, ec, lb0 (every rank block multiplied) for the per-token kernels;
    bkN, bnN, wN, ewN = expand warps,
    cm = per-column masks) or
    "tm128+pm0" (prefill: tmN = tokens per tile, bkN, bnN, wN, pm / ec = one shrink program per module /
    one expand program per chunk (both on by default: pm0 and ec0 turn them off), cm = per-column masks,
    mf0 = the shrink's tile index fastest, ya0 = no alignment hint for y, stN = pipeline stages)."""
    knobs = _DECODE_KNOBS if op == "decode" else _PREFILL_KNOBS
    kw = {}
    for part in name.split("+"):
        if op == "decode" and part in _DECODE_GROUPINGS:
            kw["grouping"] = part
            continue
        key = next((k for k in sorted(knobs, key=len, reverse=True) if part.startswith(k)), None)
        if key is None:
            raise SystemExit(f"unknown lora_{op} variant knob {part!r} (known: {', '.join(knobs)})")
        rest = part[len(key):]
        kw[knobs[key]] = int(rest) if rest else True
    if op == "prefill":
        tm = kw.get("block_tokens", 64)
        kw["num_tiles"] = lora_tiles.max_tiles(dims.num_tokens, dims.num_slots, tm)
    return kw


def lora_parts(runner, op, y, consts, dims) -> dict:
    """The default Pallas path's two kernels (shrink, expand) timed apart: where the op's time goes.

    The shrink's loop carries x (plus 1e-30 x the sum of v, so that every call depends on all of v: an
    elementwise pass over x more); the expand's carries y, with v fixed."""
    x, pool, layer, a_pages, b_pages, ranks, scales, slot = consts
    interpret = not pk._backend.on_gpu()
    if op == "decode":
        bk = pow2_divisor(dims.width, lora_decode_triton.BLOCK_K)
        bn = pow2_divisor(dims.width, lora_decode_triton.BLOCK_N)
        if (lora_decode_triton.DEFAULT_GROUPING != "none"
                and lora_decode_triton.grouped_unsupported_reason(dims, bk, bn) is None):
            # The defaults of lora_decode_pallas's grouped path; the plan (a sort) is outside both timings.
            tm, grouping = lora_decode_triton.GROUP_TOKENS, lora_decode_triton.DEFAULT_GROUPING
            kw = dict(dims=dims, interpret=interpret, num_warps=4, tm=tm, gks=lora_decode_triton.GROUP_SPLITS,
                      sks=lora_decode_triton.default_single_splits(dims, bk), in_kernel=grouping == "kernel")
            shrink_fn = functools.partial(lora_decode_triton.grouped_shrink_pallas, bk=bk, **kw)
            expand_fn = functools.partial(lora_decode_triton.grouped_expand_pallas, bn=bn, **kw)
            plan = jax.jit(functools.partial(lora_decode_triton.grouped_plan, dims=dims, tm=tm, grouping=grouping))(
                sanitize_slots(slot, dims), layer, ranks)

            def shrink(c, k):
                v = shrink_fn(c, *k)
                return c + (jnp.sum(v) * 1e-30).astype(c.dtype)

            shrink_consts = (pool, a_pages, scales, plan)
            v = jax.jit(shrink_fn)(x, *shrink_consts)
            s_sec, _ = in_loop_seconds(shrink, x + 0, shrink_consts, runner.args.target_s)
            e_sec, _ = in_loop_seconds(lambda c, k: expand_fn(c, *k), y + 0, (v, pool, b_pages, plan),
                                       runner.args.target_s)
            return {"part_shrink_us": 1e6 * s_sec, "part_expand_us": 1e6 * e_sec}
        bk, bn, ks, per_chunk = lora_decode_triton.per_token_knobs(dims)  # the defaults of lora_decode_pallas
        kw = dict(dims=dims, interpret=interpret, num_warps=4, ks=ks)
        shrink_fn = functools.partial(lora_decode_triton.shrink_pallas, bk=bk, **kw)
        expand_fn = functools.partial(lora_decode_triton.expand_pallas, bn=bn, per_chunk=per_chunk, **kw)
        where = slot
    else:
        d = {k: v.default for k, v in inspect.signature(lora_prefill_triton.lora_prefill_pallas).parameters.items()}
        tm = d["block_tokens"]
        nt = lora_tiles.max_tiles(dims.num_tokens, dims.num_slots, tm)
        where = lora_tiles.segment_tiles(slot, tm, nt)[:3]  # the sweep's slots are sorted
        stages = d["num_stages"] or lora_prefill_triton.default_stages(dims, tm, d["block_k"], d["block_n"],
                                                                       x.dtype.itemsize)
        kw = dict(dims=dims, interpret=interpret, tm=tm, num_warps=d["num_warps"], num_stages=stages)
        shrink_fn = functools.partial(lora_prefill_triton.shrink_pallas, bk=d["block_k"],
                                      per_module=d["shrink_per_module"], module_fastest=d["module_fastest"], **kw)
        expand_fn = functools.partial(lora_prefill_triton.expand_pallas, bn=d["block_n"],
                                      per_chunk=d["expand_per_chunk"], y_align_hint=d["y_align_hint"], **kw)

    def shrink(c, k):
        v = shrink_fn(c, *k)
        return c + (jnp.sum(v) * 1e-30).astype(c.dtype)

    shrink_consts = (pool, layer, a_pages, ranks, scales, where)
    v = jax.jit(shrink_fn)(x, *shrink_consts)
    s_sec, _ = in_loop_seconds(shrink, x + 0, shrink_consts, runner.args.target_s)
    e_sec, _ = in_loop_seconds(lambda c, k: expand_fn(c, *k), y + 0, (v, pool, layer, b_pages, ranks, where),
                               runner.args.target_s)
    return {"part_shrink_us": 1e6 * s_sec, "part_expand_us": 1e6 * e_sec}


def paged_case(runner, *, B, ctx, nq, nkv, D, dtype, with_jax=True):
    q, consts, nbytes, flops = paged_inputs(runner.rng, runner.next_key(), B=B, ctx=ctx, nq=nq, nkv=nkv, D=D,
                                            dtype=dtype)
    sm = D ** -0.5

    def attn(impl):
        return lambda qq, k: pk.paged_decode_attention(qq, *k, sm_scale=sm, implementation=impl)

    def run():
        res = runner.timed(attn, q, consts)  # the output [B, Nq, D] is the next query: nothing is dead code
        if with_jax:
            res.update(_jax_paged_attention(runner, q, consts, nkv, D, sm))
        return res

    runner.record("paged_decode_attention", f"B={B} ctx={ctx}", dict(B=B, ctx=ctx, nq=nq, nkv=nkv, D=D), nbytes,
                  flops, run)


def _jax_paged_attention(runner, q, consts, nkv, D, sm):
    """jax.experimental.pallas.ops.gpu.paged_attention on the same bytes (its own [Nkv, P, R, D] layout)."""
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as jpa
    except Exception as e:  # not importable on this jax
        return {"jax_paged_error": f"{type(e).__name__}: {e}"}
    pool, _, k_pages, _, lengths = consts
    B, NB = k_pages.shape
    kp = jnp.asarray(runner.rng.permutation(B * NB).reshape(B, NB).astype(np.int32))
    k_all = random_pool(runner.next_key(), (nkv, B * NB, R, D), q.dtype) * 10
    v_all = random_pool(runner.next_key(), (nkv, B * NB, R, D), q.dtype) * 10
    k_splits = max(1, min(16, NB))
    while NB % k_splits:
        k_splits //= 2

    def step(c, k):
        return jpa.paged_attention(c * sm, k[0], k[1], k[2], k[3], k_splits=k_splits,
                                   interpret=not pk._backend.on_gpu())

    try:
        sec, _ = in_loop_seconds(step, q + 0, (k_all, v_all, kp, lengths), runner.args.target_s)
        return {"jax_paged_us": 1e6 * sec}
    except Exception as e:
        return {"jax_paged_error": f"{type(e).__name__}: {e}"[:500]}


def prefill_attention_case(runner, *, T, segments, nq, nkv, D, dtype):
    key = runner.next_key()
    n = T // segments
    seg = np.repeat(np.arange(segments), n).astype(np.int32)
    pos = np.tile(np.arange(n), segments).astype(np.int32)
    k1, k2, k3 = jax.random.split(key, 3)
    q = random_pool(k1, (T, nq, D), dtype) * 10
    kv = (random_pool(k2, (T, nkv, D), dtype) * 10, random_pool(k3, (T, nkv, D), dtype) * 10)
    consts = (*kv, jnp.asarray(seg), jnp.asarray(pos))
    sm = D ** -0.5
    nbytes = jnp.dtype(dtype).itemsize * T * D * (2 * nq + 2 * nkv)
    flops = 4 * segments * (n * (n + 1) // 2) * nq * D

    def attn(impl):
        return lambda qq, k: pk.prefill_attention(qq, *k, sm_scale=sm, implementation=impl)

    def run():
        return runner.timed(attn, q, consts)  # the output [T, Nq, D] is the next query

    runner.record("prefill_attention", f"T={T} segments={segments}", dict(T=T, segments=segments, nq=nq, nkv=nkv, D=D),
                  nbytes, flops, run)


def write_kv_case(runner, *, T, P, W, dtype):
    k1, k2, k3 = jax.random.split(runner.next_key(), 3)
    pool = random_pool(k1, (2, P, R, W), dtype)
    rows = runner.rng.permutation(P * R)[: 2 * T].astype(np.int32)
    consts = (random_pool(k2, (T, W), dtype), random_pool(k3, (T, W), dtype), jnp.asarray(rows[:T]),
              jnp.asarray(rows[T:]))
    nbytes = 4 * T * W * jnp.dtype(dtype).itemsize

    def run():
        def step_of(impl):
            return lambda c, k: pk.write_kv(c, 1, *k, implementation=impl)

        return runner.timed(step_of, pool, consts)

    runner.record("write_kv", f"T={T} pool={2 * P * R * W * jnp.dtype(dtype).itemsize >> 20}MiB",
                  dict(T=T, P=P, W=W), nbytes, 0, run)


# ----------------------------------------------------------------------------------------------
# Tuning: the Pallas kernels' block sizes and warps (full runs and --tune)


def tune(runner, dtype, tiny: bool = False):
    """Times a few Pallas configurations of the three hot kernels; rows carry op="tune:<kernel>".

    tiny: toy sizes and a single configuration each (to check this code path on the CPU).
    """
    rng, interpret = runner.rng, not pk._backend.on_gpu()

    def pallas_us(step, carry, consts):
        return {"pallas_us": 1e6 * in_loop_seconds(step, carry + 0, consts, runner.args.target_s)[0]}

    # Paged decode attention, B = 128, ctx = 2048.
    B, ctx, nq, nkv, D = (2, 64, 4, 2, 16) if tiny else (128, 2048, 32, 8, 128)
    q, consts, nbytes, flops = paged_inputs(rng, runner.next_key(), B=B, ctx=ctx, nq=nq, nkv=nkv, D=D, dtype=dtype)
    dims = paged_layout.validate("tune", q, *consts, D ** -0.5, None)
    grid = [(32, 4, None)] if tiny else [(bt, nw, ns) for bt in (32, 64, 128) for nw in (4, 8) for ns in (None, 2)]
    for bt, nw, ns in grid:
        step = functools.partial(_paged_step, dims=dims, interpret=interpret, block_tokens=bt, num_warps=nw,
                                 num_splits=ns)
        runner.record("tune:paged_decode_attention", f"bt={bt} warps={nw} splits={ns}",
                      dict(block_tokens=bt, num_warps=nw, num_splits=ns), nbytes, flops,
                      functools.partial(pallas_us, step, q, consts))
    # LoRA decode, 256 tokens on 256 adapters, rank 16, q/k/v W = 1024.
    T, d_in, outs, W = (8, 64, (64, 32), 32) if tiny else (256, H, (H, 1024, 1024), 1024)
    y, consts, nbytes, flops = lora_inputs(rng, runner.next_key(), T=T, distinct=T, rank=16, d_in=d_in,
                                           out_sizes=outs, W=W, dtype=dtype)
    dims = validate_lora_args("tune", y, *consts[:7], consts[7], outs)
    grid = [(32, 4)] if tiny else [(bk, nw) for bk in (256, 512, 1024) for nw in (2, 4, 8)]
    for bk, nw in grid:
        step = functools.partial(_lora_decode_step, dims=dims, interpret=interpret, block_k=bk, block_n=bk,
                                 num_warps=nw)
        runner.record("tune:lora_decode", f"block={bk} warps={nw}", dict(block=bk, num_warps=nw), nbytes, flops,
                      functools.partial(pallas_us, step, y, consts))
    for bk, nw in ([(32, 4)] if tiny else [(bk, nw) for bk in (128, 256, 512) for nw in (4, 8)]):
        step = functools.partial(_lora_decode_step, dims=dims, interpret=interpret, block_k=bk, block_n=bk,
                                 num_warps=nw, fused=True)
        runner.record("tune:lora_decode", f"fused block={bk} warps={nw}", dict(block=bk, num_warps=nw, fused=True),
                      nbytes, flops, functools.partial(pallas_us, step, y, consts))
    # LoRA prefill, 8192 tokens in 16 segments, rank 64.
    T, S = (64, 2) if tiny else (8192, 16)
    y, consts, nbytes, flops = lora_inputs(rng, runner.next_key(), T=T, distinct=S, rank=64, d_in=d_in,
                                           out_sizes=outs, W=W, dtype=dtype, sorted_slots=True)
    dims = validate_lora_args("tune", y, *consts[:7], consts[7], outs)
    grid = [(16, 32, 4)] if tiny else [(tm, bk, nw) for tm in (32, 64, 128) for bk in (64, 128) for nw in (4, 8)]
    for tm, bk, nw in grid:
        step = functools.partial(_lora_prefill_step, dims=dims, interpret=interpret, num_tiles=lora_tiles.max_tiles(
            T, S, tm), tiles=pk.lora_prefill_tiles(consts[7], S, tm), block_tokens=tm, block_k=bk, block_n=bk,
            num_warps=nw)
        runner.record("tune:lora_prefill", f"tm={tm} block={bk} warps={nw}",
                      dict(block_tokens=tm, block=bk, num_warps=nw), nbytes, flops,
                      functools.partial(pallas_us, step, y, consts))


def _paged_step(c, k, **kw):
    return paged_triton.paged_decode_attention_pallas(c, *k, **kw)


def _lora_decode_step(c, k, **kw):
    return lora_decode_triton.lora_decode_pallas(c, *k[:7], k[7], **kw)


def _lora_prefill_step(c, k, *, num_tiles, tiles, block_tokens=64, **kw):
    """A variant: the kernels with the tile list computed once outside the calls, as the engine's step does."""
    return lora_prefill_triton.lora_prefill_pallas(c, *k[:7], tiles, num_tiles=num_tiles, block_tokens=block_tokens,
                                                   **kw)


# ----------------------------------------------------------------------------------------------
# Sweeps


def gpu_sweep(runner, quick: bool, dtype):
    qkv = (H, (H, 1024, 1024))
    shapes = {
        "qkv_gqa_W1024": (1024,) + qkv,
        "qkv_mha_W4096": (4096, H, (H, H, H)),
        "o_mha_W4096": (4096, H, (H,)),
        "gate_up_11008": (1024, H, (11008, 11008)),
        "down_11008": (1024, 11008, (H,)),
        "gate_up_14336": (1024, H, (14336, 14336)),
        "down_14336": (1024, 14336, (H,)),
    }
    if runner.args.lora_decode_cases:
        decode = [(int(T), int(d), r if r == "mixed" else int(r), sh) for T, d, r, sh in
                  (c.split(":") for c in runner.args.lora_decode_cases.split(","))]
    elif quick:
        # Issue 15's cases first: one adapter shared by 256 tokens, the 256-adapter target, small batches on one
        # adapter (T = 1..8), then a few adapters shared by many tokens in random order (the grouping's sort).
        decode = [(256, 1, 16, "qkv_gqa_W1024"), (256, 256, 16, "qkv_gqa_W1024")]
        decode += [(T, 1, 16, "qkv_gqa_W1024") for T in (1, 2, 4, 8)]
        decode += [(8, 8, 16, "qkv_gqa_W1024"), (256, 5, 16, "qkv_gqa_W1024"), (64, 8, 16, "qkv_gqa_W1024")]
        decode += [(256, 256, 64, "qkv_mha_W4096"), (256, 256, "mixed", "qkv_gqa_W1024"),
                   (256, 1, 16, "gate_up_14336"), (256, 256, "mixed", "gate_up_14336"), (1, 1, 16, "gate_up_14336")]
    else:
        decode = [(T, d, r, s) for s in shapes for T in (1, 16, 64, 256, 512) for d in sorted({1, min(8, T), T})
                  for r in (8, 16, 32, 64, "mixed")]
    # Ceilings-first order: the cases people look at first run first.
    for T, d, r, s in decode:
        W, d_in, outs = shapes[s]
        lora_case(runner, "decode", T=T, distinct=d, rank=r, d_in=d_in, out_sizes=outs, W=W, shape_name=s,
                  dtype=dtype)
    prefill = [(8192, segs, 64, "qkv_gqa_W1024") for segs in (1, 16, 64)]
    if runner.args.lora_prefill_cases:
        prefill = [(int(T), int(d), r if r == "mixed" else int(r), sh) for T, d, r, sh in
                   (c.split(":") for c in runner.args.lora_prefill_cases.split(","))]
    for T, segs, r, s in prefill:
        W, d_in, outs = shapes[s]
        lora_case(runner, "prefill", T=T, distinct=segs, rank=r, d_in=d_in, out_sizes=outs, W=W, shape_name=s,
                  dtype=dtype, sorted_slots=True)
    batches, ctxs = ((32, 128), (512, 2048)) if quick else ((32, 64, 128, 256), (512, 1024, 2048, 4096))
    for B in batches:
        for ctx in ctxs:
            paged_case(runner, B=B, ctx=ctx, nq=32, nkv=8, D=128, dtype=dtype)
    for segs in ((16,) if quick else (1, 4, 16)):
        prefill_attention_case(runner, T=4096, segments=segs, nq=32, nkv=8, D=128, dtype=dtype)
    for T in ((256,) if quick else (32, 256, 8192)):
        write_kv_case(runner, T=T, P=65536, W=1024, dtype=dtype)
    if runner.args.tune or not quick:
        tune(runner, dtype)


def cpu_smoke(runner, dtype):
    """Tiny shapes on the CPU (Pallas in interpret mode): checks the script, not the numbers."""
    lora_case(runner, "decode", T=4, distinct=2, rank="mixed", d_in=64, out_sizes=(64, 32), W=32,
              shape_name="tiny", dtype=dtype)
    # Tiles of one adapter (16 + 4 tokens): MBGMV's grouped path.
    lora_case(runner, "decode", T=20, distinct=1, rank=16, d_in=64, out_sizes=(64, 32), W=32,
              shape_name="tiny_shared", dtype=dtype)
    lora_case(runner, "prefill", T=64, distinct=2, rank=64, d_in=64, out_sizes=(32,), W=32, shape_name="tiny",
              dtype=dtype, sorted_slots=True)
    paged_case(runner, B=2, ctx=32, nq=4, nkv=2, D=16, dtype=dtype, with_jax=False)
    prefill_attention_case(runner, T=32, segments=2, nq=2, nkv=1, D=16, dtype=dtype)
    write_kv_case(runner, T=4, P=8, W=32, dtype=dtype)
    if runner.args.tune:
        tune(runner, dtype, tiny=True)


# ----------------------------------------------------------------------------------------------
# Output


def _fmt(v, nd=1):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _fmt_row(r):
    if "error" in r and not any(k.endswith("_us") for k in r):
        return f"{r['op']:<24} {r['name']:<44} ERROR {r['error'][:120]}"
    if "skipped" in r:
        return f"{r['op']:<24} {r['name']:<44} skipped ({r['skipped']})"
    return (f"{r['op']:<24} {r['name']:<44} pallas {_fmt(r.get('pallas_us')):>9} us  xla {_fmt(r.get('xla_us')):>9} us"
            f"  floor {_fmt(r.get('floor_us')):>8} us  {_fmt(r.get('pallas_pct_copy_bw'), 0):>4}% bw"
            f"  x{_fmt(r.get('speedup_vs_xla'), 2)}  err {r.get('rel_err', float('nan')):.1e}"
            + (f"  jax_paged {_fmt(r['jax_paged_us'])} us" if "jax_paged_us" in r else "")
            + (f"  shrink {_fmt(r['part_shrink_us'])} us expand {_fmt(r['part_expand_us'])} us"
               if "part_shrink_us" in r else "")
            + (f"  x{r['replicas']} replicas {_fmt(r.get('pallas_aggregate_GBps'), 0)} GB/s in all"
               + (" DIFFER" if r.get("replicas_differ") else "") if r.get("replicas") else "")
            + "".join(f"  {k[len('pallas_'):-3]} {_fmt(r[k])} us {_fmt(r.get(k[:-3] + '_pct_copy_bw'), 0)}% bw"
                      f" err {r.get(k[:-3] + '_rel_err', float('nan')):.1e}"
                      for k in r if k.startswith("pallas_") and k.endswith("_us") and k != "pallas_us")
            + (f"  ERROR {r['error'][:300]}" if "error" in r else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="kernels.json")
    p.add_argument("--quick", action="store_true", help="a trimmed sweep (~4 minutes on an H200)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in interpret mode on the CPU")
    p.add_argument("--tune", action="store_true",
                   help="also sweep Pallas block sizes / warps (always on when not --quick)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="default bfloat16 (float32 with --cpu-smoke, where bf16 outputs often agree exactly)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--target-s", type=float, default=None, help="wall time of one timed loop")
    p.add_argument("--ops", default=None, help="comma list of ops to run (default: all)")
    p.add_argument("--lora-decode-variants", default="none,sort",
                   help="Pallas lora_decode variants timed beside the default: comma list of knobs joined by '+' "
                        "(kernel / sort / runs / none: MBGMV's grouping, none = the per-token kernels; gsN / ssN: "
                        "parts of d_in per group tile / lone token; stN: the grouped kernels' pipeline stages; "
                        "fused, ksN, ec: per-token kernels, with none; bkN, bnN, wN warps, ewN expand warps, cm "
                        "per-column masks), e.g. none,gs4,gs16,st3,none+ks2")
    p.add_argument("--lora-decode-cases", default=None,
                   help="lora_decode cases instead of the sweep's: comma list of T:adapters:rank:shape "
                        "(rank an int or 'mixed'; shape a key of gpu_sweep's table, e.g. qkv_gqa_W1024)")
    p.add_argument("--lora-prefill-cases", default=None,
                   help="lora_prefill (MBGMM, tokens sorted by adapter) cases instead of the sweep's: comma list of "
                        "T:segments:rank:shape, as --lora-decode-cases")
    p.add_argument("--lora-prefill-variants", default="",
                   help="Pallas lora_prefill variants timed beside the default: comma list of knobs joined by '+' "
                        "(tmN tokens per tile, bkN, bnN, wN warps, pm0 one shrink program per tile instead of per "
                        "module, ec0 one expand program per block instead of per page chunk, cm per-column masks)")
    p.add_argument("--lora-parts", "--lora-decode-parts", dest="lora_parts", action="store_true",
                   help="also time the LoRA ops' shrink and expand kernels apart (part_shrink_us, part_expand_us)")
    p.add_argument("--calls-per-iteration", type=int, default=None,
                   help="calls of the op per iteration of the timing loop (default 8; 1 with --cpu-smoke)")
    p.add_argument("--replicas", type=int, default=1,
                   help="run every checked case on this many local devices at once, one replica each, under "
                        "jax.shard_map (0 = all local devices); times are then those of all replicas together")
    args = p.parse_args(argv)
    args.ops = set(args.ops.split(",")) if args.ops else None
    if args.cpu_smoke:
        jax.config.update("jax_platforms", "cpu")
    args.budget_s = args.budget_s or (210.0 if args.quick else 3600.0)
    args.target_s = args.target_s or (0.005 if args.cpu_smoke else 0.05)
    args.dtype = args.dtype or ("float32" if args.cpu_smoke else "bfloat16")
    global CALLS_PER_ITERATION
    CALLS_PER_ITERATION = args.calls_per_iteration or (1 if args.cpu_smoke else 8)
    dtype = jnp.dtype(args.dtype)

    dev = jax.devices()[0]
    print(f"device {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    bandwidth = measure_copy_bandwidth((4 << 20) if args.cpu_smoke else (2 << 30), args.target_s)
    bw = bandwidth.bytes_per_s
    mm = matmul_rate(256 if args.cpu_smoke else 8192, args.target_s)
    print(f"{bandwidth.describe()}; bf16 matmul {mm / 1e12:.1f} TFLOP/s", flush=True)

    # What the timing loop costs around any op (a one-element add): one iteration with one call, and one call
    # of the CALLS_PER_ITERATION in an iteration (the floor under every time here).
    loop_us = 1e6 * in_loop_seconds(lambda c, k: c + 1, jnp.zeros((1,), jnp.float32), (), args.target_s, calls=1)[0]
    call_us = 1e6 * in_loop_seconds(lambda c, k: c + 1, jnp.zeros((1,), jnp.float32), (), args.target_s)[0]
    print(f"timing loop: {loop_us:.1f} us per iteration of one call; {call_us:.1f} us per call at "
          f"{CALLS_PER_ITERATION} calls per iteration", flush=True)
    runner = Runner(args, bw, mm)
    if args.cpu_smoke:
        cpu_smoke(runner, dtype)
    else:
        gpu_sweep(runner, args.quick, dtype)

    report = dict(
        device=f"{dev.device_kind} ({dev.platform})", jax_version=jax.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv), dtype=args.dtype,
        **bandwidth.as_dict(), matmul_bf16_TFLOPs=mm / 1e12, loop_overhead_us=loop_us,
        calls_per_iteration=CALLS_PER_ITERATION, empty_call_us=call_us, cases=runner.results,
        total_s=time.perf_counter() - runner.t_start,
    )
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n=== {len(runner.results)} cases, {report['total_s']:.0f} s; copy {bw / 1e9:.0f} GB/s, "
          f"matmul {mm / 1e12:.0f} TFLOP/s; written to {args.out}")
    for r in runner.results:
        print(_fmt_row(r))
    tol = 2e-2 if args.dtype == "bfloat16" else 1e-4
    bad = [r for r in runner.results
           if "error" in r or r.get("replicas_differ")
           or any(v > tol for k, v in r.items() if k.endswith("rel_err") and isinstance(v, float))]
    if bad:
        print(f"{len(bad)} case(s) failed or exceeded the error tolerance")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
