"""Offline throughput (vLLM's ``benchmark_throughput`` convention) beside the floor of the work that ran.

    slora-jax bench --mode offline --model llama-3-8b --num-requests 1000 --input-len 256 --output-len 256 \
        --adapters 0,100,1000 --repeats 2 --out offline.json     (or python benchmarks/offline.py ...)

N requests of fixed lengths (greedy, ignore EOS) are handed to one ``Engine.generate`` call; the run ends
when the last finishes. One engine (random bf16 weights made on the device) serves every case, so the
step programs are compiled once (``precompile``) and every ratio is taken within one run:
- base: no request has an adapter;
- n adapters, host-resident: random LoRAs of ranks 8/16/32/64 on q/k/v/o registered from memory (names
  share host copies; each has its own device pages), each request's adapter drawn uniformly.

The floor of each run is computed from the steps that actually ran (``Engine.record_steps``): per step, the
projections (weights and the batch's adapters read once, 2 x parameters x tokens FLOPs, logits) and the
attention (K/V rows read and written once, 4 x q_size FLOPs per key attended per layer), each at
max(bytes / copy bandwidth, FLOPs / matmul rate), summed over steps (``floor_seconds``). Bandwidth and matmul
rate are measured in the same run (the best of several device copies, and a bf16 8192^3 matmul), beside the
H200's 4.8 TB/s HBM peak. Prints a table last and writes JSON.

``--adapter-source disk`` (issue 14, "1000 cold adapters offline"): the adapters are PEFT folders read from
files instead. K distinct random folders (``--distinct-folders``, default 100; ranks 8/16/32/64 on q/k/v/o in
bf16, 51 MB on average at the 8B shape) are written under ``--workdir`` and read once so that they are in the
page cache; each of the n adapter names gets its own folder that is a symbolic link to distinct folder
``i % K``, registered with ``load_adapter(name, folder, lazy=True)``. To the engine every name is a distinct
adapter whose weights are read from (page-cached) files on first use; only the file bytes repeat (1000
distinct 51 MB folders would take 51 GB of disk). Request i runs on adapter ``perm[i] % n`` (n = the number
of requests: each request its own adapter). For each count, in each repeat, the same requests run twice:
- "n adapters cold": no adapter has been read yet (each is read by the engine's reader threads on first use);
- "n adapters warm": every adapter is in the host tier (``host_cache_bytes``, ``--host-cache-gib``, default
  80 GiB with disk adapters, must hold them all: the JSON records host evictions, which should be 0).
Before each pass every adapter is dropped from the device (``evict_adapters``), so both passes upload every
adapter to the device again: cold - warm is the reading. Each pass records the engine's read counters
(``stats()`` adapter_reads, adapter_read_bytes, adapter_load_read_s, adapter_read_wall_s, ...) over that pass
with the read throughput they give, and the JSON gives cold/base and cold/warm (targets: >= 0.60, >= 0.8).
The names of a repeat are unloaded after it (a later repeat reads fresh names). Before the first cold pass
one throw-away adapter of each rank runs 2 requests (the device upload compiles per page count: outside the
timing).

GPU (one H200; about 4-5 minutes: 100 folders (5.1 GB) written in under a minute, engine and precompile
1-2 min, three passes of 1000 x 256/256 tokens of ~20-40 s each; benchmarks/cold_start.py's docstring runs
it with the second-start measurement in one device call):

    python benchmarks/offline.py --model llama-3-8b --num-requests 1000 --input-len 256 --output-len 256 \
        --adapters 0,1000 --adapter-source disk --distinct-folders 100 --host-cache-gib 80 --repeats 1 \
        --out $OUT/offline-cold-1000.json

CPU dry run (tiny model, a few minutes):

    python benchmarks/offline.py --model tiny --num-requests 48 --input-len 32 --output-len 16 --adapters 0,48 \
        --adapter-source disk --distinct-folders 6 --repeats 1 --max-batch-size 16 --max-prefill-tokens 256 \
        --dtype float32 --no-precompile --out /tmp/offline-cold.json
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import slora_jax as sj
from sharding import make_mesh
from slora_jax.bench import timeline
from slora_jax.bench.floors import HBM_PEAK, copy_bandwidth, floor_seconds, matmul_rate, step_breakdown
from slora_jax.bench.setup import DEFAULT_TARGETS, SyntheticAdapters, page_cache, resolve_model
from slora_jax.model.init import random_fused_params


# Engine counters of the adapter reads and loads, as stats() names them (summed over a pass).
READ_COUNTERS = ("adapter_reads", "adapter_read_bytes", "adapter_load_read_s", "adapter_read_wall_s",
                 "adapter_read_failures", "adapter_host_loads", "adapter_host_evictions", "adapter_loads",
                 "adapter_evictions", "adapter_load_bytes", "adapter_load_wait_s", "adapter_hidden_loads",
                 "adapter_prefetch_loads")


class DiskAdapters:
    """PEFT folders on disk for n adapter names: K distinct random folders (rank ``ranks[k % len(ranks)]``)
    and, per name, a symbolic link to folder ``i % K`` (a distinct adapter to the engine, read on first use
    from files that are page-cached; only the bytes repeat)."""

    def __init__(self, cfg, workdir: Path, distinct: int, ranks=(8, 16, 32, 64), targets=DEFAULT_TARGETS,
                 dtype: str = "bfloat16"):
        self.cfg, self.root, self.distinct, self.ranks, self.targets = cfg, Path(workdir), distinct, ranks, targets
        self.dtype, self.folders, self.write_s, self.cache_s, self.file_bytes = dtype, [], 0.0, 0.0, 0

    def rank(self, k: int) -> int:
        return self.ranks[k % len(self.ranks)]

    def write(self, workers: int = 8) -> None:
        from slora_jax.model.random_checkpoint import write_random_adapter

        t0 = time.perf_counter()
        (self.root / "distinct").mkdir(parents=True, exist_ok=True)

        def one(k):
            r = self.rank(k)
            return write_random_adapter(self.root / "distinct" / f"a{k:04d}-r{r}", self.cfg, rank=r, alpha=2 * r,
                                        target_modules=self.targets, seed=1000 + k, dtype=self.dtype)
        with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, self.distinct))) as pool:
            self.folders = list(pool.map(one, range(self.distinct)))  # numpy fills and casts without the GIL
        self.write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.file_bytes = page_cache(d / "adapter_model.safetensors" for d in self.folders)
        self.cache_s = time.perf_counter() - t0

    def register(self, engine, n: int, prefix: str) -> list[str]:
        """n names ``{prefix}-{i}``, each registered lazily from its own link to folder i % K."""
        links = self.root / "names"
        links.mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(n):
            name = f"{prefix}-{i}"
            link = links / name
            if link.is_symlink():
                link.unlink()
            link.symlink_to(self.folders[i % self.distinct].resolve(), target_is_directory=True)
            engine.load_adapter(name, link, lazy=True)
            names.append(name)
        return names

    def nbytes(self, i: int, itemsize: int) -> int:
        """Bytes of adapter i's A and B in a pool of ``itemsize``-byte elements."""
        r = self.rank(i % self.distinct)
        return int(r * sum(sum(self.cfg.module_dims(m)) for m in self.targets) * self.cfg.num_layers * itemsize)

    def describe(self) -> dict:
        return dict(distinct_folders=self.distinct, ranks=list(self.ranks), targets=list(self.targets),
                    file_dtype=self.dtype, distinct_file_bytes=self.file_bytes, write_s=self.write_s,
                    page_cache_s=self.cache_s, workdir=str(self.root),
                    note="each adapter name is its own symlinked folder registered with load_adapter(lazy=True): "
                         "a distinct adapter to the engine, read from page-cached files on first use; "
                         "name i links to distinct folder i % distinct_folders (only the file bytes repeat)")


def read_stats(s0: dict, s1: dict) -> dict:
    """The engine's adapter read/load counters over a pass, with the read throughput they give."""
    d = {k: s1.get(k, 0) - s0.get(k, 0) for k in READ_COUNTERS}
    d["read_gbps"] = d["adapter_read_bytes"] / d["adapter_read_wall_s"] / 1e9 if d["adapter_read_wall_s"] else 0.0
    d["read_gbps_per_reader"] = (d["adapter_read_bytes"] / d["adapter_load_read_s"] / 1e9
                                 if d["adapter_load_read_s"] else 0.0)
    d["adapter_host_bytes_after"] = s1.get("adapter_host_bytes", 0)
    return d


def profile_steps(engine, prompts, adapters, sp, log_dir: str, top: int = 30) -> dict:
    """Device time over a short decode-heavy run, from a jax.profiler trace: per device, the span from its
    first to its last event, the time its "XLA Modules" line is busy (programs running), and the HLO ops
    ("XLA Ops" line: fusions, custom calls, collectives) that take most of it."""
    import glob
    engine.generate(prompts[:8], sampling=sp)
    trace = engine.record_steps(True)
    jax.profiler.start_trace(log_dir)
    try:
        engine.generate(prompts, adapters=adapters, sampling=sp)
    finally:
        jax.profiler.stop_trace()
        engine.record_steps(False)
    files = glob.glob(f"{log_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        return {}
    data = jax.profiler.ProfileData.from_file(files[-1])
    devices, per, kernels = [], {}, {}
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        lines = {}
        first, last = None, None
        for line in plane.lines:
            busy = 0.0
            for ev in line.events:
                busy += ev.duration_ns / 1e9
                first = ev.start_ns if first is None else min(first, ev.start_ns)
                last = ev.start_ns + ev.duration_ns if last is None else max(last, ev.start_ns + ev.duration_ns)
                if line.name == "XLA Ops":
                    key = ev.name.split(".")[0]  # fusion.12 -> fusion: one row per kind of op
                    per[key] = per.get(key, 0.0) + ev.duration_ns / 1e9
                elif line.name.startswith("Stream"):  # the kernels themselves (NCCL's among them)
                    kernels[ev.name[:80]] = kernels.get(ev.name[:80], 0.0) + ev.duration_ns / 1e9
            lines[line.name] = busy
        devices.append(dict(plane=plane.name, span_s=((last - first) / 1e9) if first is not None else 0.0,
                            modules_s=lines.get("XLA Modules", 0.0), ops_s=lines.get("XLA Ops", 0.0),
                            lines_s=lines))
    total = sum(per.values())
    ranked = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    steps = {m: sum(1 for t in trace if t["mode"] == m) for m in ("decode", "mixed")}
    ktotal = sum(kernels.values())
    return dict(total_s=total, steps=steps, devices=devices, timeline=timeline.summarize(data.planes),
                top=[dict(name=k[:120], s=v, share=v / total if total else 0.0) for k, v in ranked],
                kernels=[dict(name=k, s=v, share=v / ktotal if ktotal else 0.0)
                         for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]])


_COMPILES = {"n": 0, "s": 0.0}  # XLA compilations in this process (any thread), and their seconds
_counting = False


def _count_compiles() -> None:
    global _counting
    if _counting:
        return
    _counting = True

    def on_event(event: str, secs: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            _COMPILES["n"] += 1
            _COMPILES["s"] += secs
    jax.monitoring.register_event_duration_secs_listener(on_event)


def run_case(engine, prompts, adapters, sp, cfg, itemsize, adapter_bytes, bw, mm, host_profile: bool = False) -> dict:
    _count_compiles()
    trace = engine.record_steps(True)
    c0 = dict(_COMPILES)
    s0 = engine.stats()
    prof = None
    if host_profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, adapters=adapters, sampling=sp)
    wall = time.perf_counter() - t0
    host_top = []
    if prof is not None:
        import pstats
        prof.disable()
        st = pstats.Stats(prof)
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:25]  # by own time
        host_top = [dict(fn=f"{k[0].split('/')[-1]}:{k[1]}:{k[2]}", calls=v[1], own_s=v[2], cum_s=v[3])
                    for k, v in rows]
    s1 = engine.stats()
    compiles = dict(n=_COMPILES["n"] - c0["n"], s=_COMPILES["s"] - c0["s"])  # a step program's included
    engine.record_steps(False)
    out_tokens = sum(len(o.token_ids) for o in outs)
    assert all(o.finish_reason == "length" for o in outs), "a request did not run to its length"
    fl = floor_seconds(trace, cfg, itemsize, adapter_bytes, bw, mm)
    d = {k: s1[k] - s0[k] for k in ("steps", "mixed_steps", "decode_steps", "preemptions", "host_time_s",
                                    "step_time_s", "exposed_host_s", "prefill_tokens")}
    parts = {k: s1["host_breakdown_s"][k] - s0["host_breakdown_s"][k] for k in s1["host_breakdown_s"]}
    parts.update({f"dispatch.{k}": s1["dispatch_breakdown_s"][k] - s0["dispatch_breakdown_s"][k]
                  for k in s1["dispatch_breakdown_s"]})
    return dict(breakdown=step_breakdown(trace, cfg, itemsize, adapter_bytes, bw, mm), host_profile=host_top,
                wall_s=wall, output_tokens=out_tokens, output_tok_s=out_tokens / wall,
                total_tok_s=(out_tokens + sum(map(len, prompts))) / wall, floor=fl,
                pct_of_floor=100 * fl["floor_s"] / wall,
                host_overhead_share=d["exposed_host_s"] / d["step_time_s"] if d["step_time_s"] else 0.0,
                host_busy_share=d["host_time_s"] / d["step_time_s"] if d["step_time_s"] else 0.0,
                counters=d, host_parts_s=parts, adapter_io=read_stats(s0, s1), compiles=compiles,
                mean_distinct_adapters=float(np.mean([len(s["adapters"]) for s in trace])) if trace else 0.0)


def header() -> dict:
    """What every results file starts with: device, jax version, date and command."""
    return dict(device=str(jax.devices()[0].device_kind), jax_version=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="slora-jax bench --mode offline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b", help="named shape (NAME:layers=N: its first N) or 'tiny'")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--adapters", default="0,100,1000", help="comma list of adapter counts (0 = base)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--max-prefill-tokens", type=int, default=2048, help="tokens per step")
    ap.add_argument("--memory-fraction", type=float, default=0.85)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kernel-backend", default="auto")
    ap.add_argument("--no-precompile", action="store_true")
    ap.add_argument("--profile-dir", default=None,
                    help="also trace 256 requests of 64 tokens (base) and report device time per kernel")
    ap.add_argument("--dump-hlo", default=None,
                    help="a folder: write each TP size's largest decode programs after XLA's passes there "
                         "(decode-tp<N>-base.hlo.txt, -lora.hlo.txt), to name the kernels a --profile-dir trace shows")
    ap.add_argument("--host-profile", action="store_true",
                    help="profile the host (cProfile) in the last repeat of every case: own time per function")
    ap.add_argument("--tensor-parallel", default="1",
                    help="comma list of TP sizes, each its own engine over the same weights (e.g. 1,2): ratios "
                         "between them are taken in one run. The floor of a TP run takes TP devices' bandwidth "
                         "and matmul rate, and no collective time")
    ap.add_argument("--adapter-source", choices=("memory", "disk"), default="memory",
                    help="memory: synthetic LoRAs registered from memory (host-resident); disk: PEFT folders "
                         "registered lazily, a cold pass (read on first use) then a warm pass of the same requests")
    ap.add_argument("--distinct-folders", type=int, default=100,
                    help="disk: distinct adapter folders written; names link to them in turn")
    ap.add_argument("--workdir", default=None, help="disk: where the folders go (default: a temporary folder, "
                                                    "removed at the end)")
    ap.add_argument("--host-cache-gib", type=float, default=None,
                    help="EngineConfig.host_cache_bytes in GiB (default 200 with memory adapters, 80 with disk)")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the run's plumbing off the GPU (e.g. a large shape's first layers at TP=8 on simulated "
                         "CPU devices): the bandwidth and matmul references are measured small, so no figure means "
                         "anything")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    disk = args.adapter_source == "disk"
    if disk and args.distinct_folders < 1:
        ap.error("--distinct-folders must be at least 1")
    host_cache_gib = args.host_cache_gib if args.host_cache_gib is not None else (80 if disk else 200)
    cfg = resolve_model(args.model)[0]  # a named shape, NAME:layers=N, or tiny
    small = args.model == "tiny" or args.dry_run
    bw = copy_bandwidth(64 << 20 if small else 2 << 30)
    mm = matmul_rate(512 if small else 8192)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    itemsize = jnp.dtype(dtype).itemsize
    counts = [int(x) for x in args.adapters.split(",")]
    tps = [int(x) for x in args.tensor_parallel.split(",")]
    rng = np.random.default_rng(0)
    V = cfg.vocab_size
    prompts = [rng.integers(3, V - 1, args.input_len).tolist() for _ in range(args.num_requests)]
    # The same adapter of every request in every run, so that TP sizes and repeats see the same work.
    picks_of = {n: [int(i) for i in rng.integers(0, n, args.num_requests)] for n in counts if n}
    if disk:  # each adapter as evenly used as the counts allow (n = requests: each request its own adapter)
        perm = rng.permutation(args.num_requests)
        picks_of = {n: [int(i) % n for i in perm] for n in counts if n}
        work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="offline-adapters-"))
        if not args.workdir:  # gigabytes at real shapes: gone at exit even when a case fails
            atexit.register(shutil.rmtree, work, ignore_errors=True)
        files = DiskAdapters(cfg, work, args.distinct_folders)
        files.write(workers=min(8, os.cpu_count() or 1))
        print(f"{files.distinct} adapter folders ({files.file_bytes / 1e9:.2f} GB) written in {files.write_s:.0f} s, "
              f"page-cached in {files.cache_s:.1f} s", flush=True)
    sp = sj.SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    results, precompile_s, compiled, profile, host_tier = [], {}, {}, {}, {}
    for tp in tps:
        econf = sj.EngineConfig(dtype=args.dtype, kernel_backend=args.kernel_backend,
                                max_batch_size=args.max_batch_size, tensor_parallel=tp,
                                max_model_len=args.input_len + args.output_len + 16, num_pages=args.num_pages,
                                memory_fraction=args.memory_fraction, max_prefill_tokens=args.max_prefill_tokens,
                                max_adapters_on_device=min(max(counts + [1]), 1024),
                                host_cache_bytes=int(host_cache_gib * (1 << 30)))
        # The weights of each TP size made where its engine keeps them (split over its devices): a model larger
        # than one device (70B) never sits whole on one, and no copy of them outlives the engine. The same
        # seed gives the same values on any split.
        mesh = make_mesh(tp) if 1 < tp <= len(jax.devices()) else None  # too large: the Engine says so
        params = random_fused_params(cfg, args.dtype, mesh=mesh, seed=0,
                                     scan_layers=econf.resolved_scan_layers(jax.default_backend()))
        t0 = time.perf_counter()
        engine = sj.Engine(cfg, params, econf)
        build_s = time.perf_counter() - t0
        del params
        st = engine.stats()
        host_tier[tp] = {k: st[k] for k in ("host_arena_bytes", "host_arena_registered", "host_arena_register_s",
                                             "pinned_host_reserved_bytes", "pinned_host_reserve_s")}
        host_tier[tp]["engine_build_s"] = build_s
        if st["host_arena_bytes"]:
            how = "registered for DMA" if st["host_arena_registered"] else "not registered"
            print(f"[tp={tp}] engine built in {build_s:.1f} s; host tier: a "
                  f"{st['host_arena_bytes'] / (1 << 30):.1f} GiB arena, {how} in {st['host_arena_register_s']:.1f} s",
                  flush=True)
        if st["pinned_host_reserved_bytes"]:
            print(f"[tp={tp}] {st['pinned_host_reserved_bytes'] / (1 << 30):.1f} GiB of pinned host memory reserved "
                  f"in {st['pinned_host_reserve_s']:.1f} s", flush=True)
        synth = SyntheticAdapters(cfg, (8, 16, 32, 64), weight_sets=2)
        names = synth.register(engine, max(counts)) if max(counts) and not disk else []
        # Bytes each adapter's A and B take in the pool's dtype: what a step using it must read at least once.
        adapter_bytes = {n: synth.nbytes(i, itemsize) for i, n in enumerate(names)}
        wnames = []
        if disk and max(counts):
            # Registered before precompile, so that it covers the programs with the adapters' LoRA groups (as a
            # server that starts with its adapters does): else the first cold pass compiles them on demand,
            # seconds each, and the warm pass finds them compiled. The device upload compiles per page count
            # (one per rank): one throw-away adapter of each rank runs below, so no cold pass compiles.
            wnames = files.register(engine, min(len(files.ranks), files.distinct), f"warmup-tp{tp}")
        t0 = time.perf_counter()
        compiled[tp] = [] if args.no_precompile else engine.precompile(sampling=False)
        precompile_s[tp] = time.perf_counter() - t0
        print(f"[tp={tp}] {len(compiled[tp])} programs compiled in {precompile_s[tp]:.0f} s", flush=True)
        warm8 = sj.SamplingParams(max_tokens=8, ignore_eos=True)
        engine.generate(prompts[:8], sampling=warm8)  # warm-up
        if wnames:
            engine.generate(prompts[:2 * len(wnames)], adapters=[wnames[i % len(wnames)] for i in
                                                                range(2 * len(wnames))], sampling=warm8)
            for nm in wnames:
                engine.unload_adapter(nm)

        def record(res):
            results.append(res)
            if args.out:  # after every case: a run cut short still leaves what it measured
                with open(args.out, "w") as f:
                    json.dump(dict(partial=True, **header(), results=results), f, indent=1, default=float)
            io = res["adapter_io"]
            print(f"[tp={tp} {res['case']} #{res['repeat']}] {res['output_tok_s']:.0f} out tok/s, "
                  f"{res['pct_of_floor']:.0f}% of floor, host share {res['host_overhead_share']:.3f}, "
                  f"steps {res['counters']['steps']}, adapter reads {io['adapter_reads']} "
                  f"({io['adapter_read_bytes'] / 1e9:.2f} GB, {io['read_gbps']:.2f} GB/s), "
                  f"{res['compiles']['n']} compiles ({res['compiles']['s']:.1f} s)", flush=True)

        for rep in range(args.repeats):
            for n in counts:
                prof = args.host_profile and rep == args.repeats - 1
                if n and disk:
                    dnames = files.register(engine, n, f"disk-tp{tp}-r{rep}")
                    adapter_bytes = {nm: files.nbytes(i, itemsize) for i, nm in enumerate(dnames)}
                    picks = [dnames[i] for i in picks_of[n]]
                    for phase in ("cold", "warm"):
                        engine.evict_adapters()  # both passes upload every adapter to the device
                        res = run_case(engine, prompts, picks, sp, cfg, itemsize, adapter_bytes,
                                       tp * bw["bytes_per_s"], tp * mm, host_profile=prof)
                        res.update(case=f"{n} adapters {phase}", adapters=n, phase=phase, repeat=rep,
                                   tensor_parallel=tp, adapter_source="disk")
                        record(res)
                    for nm in dnames:
                        engine.unload_adapter(nm)  # a later repeat reads fresh names
                    continue
                picks = None if n == 0 else [names[i] for i in picks_of[n]]
                res = run_case(engine, prompts, picks, sp, cfg, itemsize, adapter_bytes, tp * bw["bytes_per_s"],
                               tp * mm, host_profile=prof)
                res.update(case="base" if n == 0 else f"{n} adapters", adapters=n, repeat=rep, tensor_parallel=tp)
                record(res)
        if args.dump_hlo:
            os.makedirs(args.dump_hlo, exist_ok=True)
            rows = max(size for mode, size, _ in engine.step_shapes() if mode == "decode")  # the largest bucket
            for kind, groups in (("base", ()), ("lora", None)):  # None: the LoRA groups of the adapters registered
                with open(f"{args.dump_hlo}/decode-tp{tp}-{kind}.hlo.txt", "w") as f:
                    f.write(engine.lower_step("decode", rows, lora_groups=groups).compile().as_text())
        if args.profile_dir:
            psp = sj.SamplingParams(max_tokens=64, ignore_eos=True)
            for n in counts:
                if n and disk:
                    continue  # the disk adapters of a repeat are gone by now
                some = prompts[:256]
                picks = None if n == 0 else [names[i] for i in picks_of[n][:len(some)]]
                profile[f"tp{tp}/{n}"] = profile_steps(engine, some, picks, psp, f"{args.profile_dir}/tp{tp}/{n}")
        engine.close()  # its pool and weights go before the next TP size sizes its pool from what is free
        del engine, synth
        gc.collect()
    if disk and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    base = {(r["tensor_parallel"], r["repeat"]): r["output_tok_s"] for r in results if r["adapters"] == 0}
    first = {(r["case"], r["repeat"]): r["output_tok_s"] for r in results if r["tensor_parallel"] == tps[0]}
    warm = {(r["tensor_parallel"], r["repeat"], r["adapters"]): r["output_tok_s"] for r in results
            if r.get("phase") == "warm"}
    for r in results:
        if (r["tensor_parallel"], r["repeat"]) in base:
            r["vs_base"] = r["output_tok_s"] / base[(r["tensor_parallel"], r["repeat"])]
        r[f"vs_tp{tps[0]}"] = r["output_tok_s"] / first[(r["case"], r["repeat"])]
        if r.get("phase") == "cold" and (r["tensor_parallel"], r["repeat"], r["adapters"]) in warm:
            r["cold_vs_warm"] = r["output_tok_s"] / warm[(r["tensor_parallel"], r["repeat"], r["adapters"])]
    cold_summary = [dict(tensor_parallel=r["tensor_parallel"], repeat=r["repeat"], adapters=r["adapters"],
                         cold_tok_s=r["output_tok_s"], cold_vs_base=r.get("vs_base"),
                         cold_vs_warm=r.get("cold_vs_warm"), cold_reads=r["adapter_io"],
                         warm_host_evictions=next(w["adapter_io"]["adapter_host_evictions"] for w in results
                                                  if w.get("phase") == "warm" and w["repeat"] == r["repeat"]
                                                  and w["tensor_parallel"] == r["tensor_parallel"]
                                                  and w["adapters"] == r["adapters"]),
                         targets=dict(cold_vs_base=0.60, cold_vs_warm=0.8))
                    for r in results if r.get("phase") == "cold"]
    record = dict(
        **header(), model=args.model, copy_bandwidth=bw,
        hbm_peak_bytes_per_s=HBM_PEAK, matmul_flops_per_s=mm, precompile_s=precompile_s, host_tier=host_tier,
        programs_compiled={tp: len(c) for tp, c in compiled.items()}, adapter_source=args.adapter_source,
        host_cache_bytes=int(host_cache_gib * (1 << 30)), num_requests=args.num_requests,
        input_len=args.input_len, output_len=args.output_len,
        disk_adapters=files.describe() if disk else None, cold=cold_summary, results=results, profile=profile)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1, default=float)
    print(f"\ncopy bandwidth {bw['bytes_per_s'] / 1e12:.2f} TB/s ({bw.get('method')}; HBM peak 4.8), "
          f"matmul {mm / 1e12:.0f} TFLOP/s, " + ", ".join(
              f"tp={tp}: precompile {precompile_s[tp]:.0f} s for {len(compiled[tp])} programs" for tp in tps))
    for r in results:
        print(f"  tp={r['tensor_parallel']} {r['case']} #{r['repeat']}: " + ", ".join(
            f"{k}: {v['steps']} steps {v['mean_step_ms']:.2f} ms ({v['pct_of_floor']:.0f}% of floor)"
            for k, v in sorted(r["breakdown"].items())))
    for c in cold_summary:
        io = c["cold_reads"]
        print(f"  tp={c['tensor_parallel']} #{c['repeat']} {c['adapters']} cold adapters: "
              f"cold/base {c['cold_vs_base'] or float('nan'):.3f} (>= 0.60), "
              f"cold/warm {c['cold_vs_warm'] or float('nan'):.3f} (>= 0.8); cold pass read {io['adapter_reads']} "
              f"adapters, {io['adapter_read_bytes'] / 1e9:.2f} GB in {io['adapter_read_wall_s']:.2f} s of reading "
              f"({io['read_gbps']:.2f} GB/s; {io['read_gbps_per_reader']:.2f} GB/s per reader, "
              f"{io['adapter_load_read_s']:.2f} reader-s), failures {io['adapter_read_failures']}, "
              f"host evictions in the warm pass {c['warm_host_evictions']}")
    for r in results:
        if r["host_profile"]:
            print(f"  host, {r['case']}: " + "; ".join(f"{h['fn']} {h['own_s']:.2f}s" for h in r["host_profile"][:8]))
    for n, prof in profile.items():
        print(f"  profile, {n} adapters: {prof.get('total_s', 0):.3f} s of device op time, steps {prof.get('steps')}")
        for d in prof.get("devices", []):
            print(f"    {d['plane']}: span {d['span_s']:.3f} s, programs {d['modules_s']:.3f} s, "
                  f"ops {d['ops_s']:.3f} s")
        for what in ("top", "kernels"):
            print(f"    {what}: " + "; ".join(f"{t['name'][:50]} {t['s'] * 1e3:.0f} ms ({t['share']:.0%})"
                                         for t in prof.get(what, [])[:12]))
        for line in timeline.describe(prof.get("timeline") or {}):
            print("    " + line)
        for p in (prof.get("top") or [])[:18]:
            print(f"    {p['share'] * 100:5.1f}% {p['s'] * 1e3:8.1f} ms  {p['name']}")
    print(f"{'tp':>3} {'case':<16}{'rep':>4}{'out tok/s':>11}{'vs base':>9}{'vs tp' + str(tps[0]):>9}{'% floor':>9}"
          f"{'host':>7}{'busy':>7}{'steps':>7}{'mixed':>7}{'preempt':>8}{'adapters/step':>14}")
    for r in results:
        c = r["counters"]
        print(f"{r['tensor_parallel']:>3} {r['case']:<16}{r['repeat']:>4}{r['output_tok_s']:>11.0f}"
              f"{r.get('vs_base', float('nan')):>9.3f}{r['vs_tp' + str(tps[0])]:>9.3f}"
              f"{r['pct_of_floor']:>9.1f}{r['host_overhead_share']:>7.3f}{r['host_busy_share']:>7.3f}{c['steps']:>7}"
              f"{c['mixed_steps']:>7}{c['preemptions']:>8}{r['mean_distinct_adapters']:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
