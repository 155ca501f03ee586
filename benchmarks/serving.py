"""S-LoRA's serving study (settings S1/S2, Llama-2-7B shape) on one GPU, with every baseline.

    python benchmarks/serving.py --out-dir benchmarks/results/serving-h200

On the H200, stages 1-3 take ~9 minutes and stage 4 ~7 more (its 41 xla programs compile in ~6 minutes),
so under a 10-minute limit run stage 4 on its own: --kernel-backends pallas,xla --settings S2
--num-adapters 100 --peft-limit 0 --slo-fractions "" --no-merged. A study cut short keeps every finished
run in serving.json; --report then writes its table and plot.

Stages (each prints as it goes; the table of the issue's ratios is printed last):
  1. transformers + PEFT, static batches (a subprocess, before JAX takes the GPU): S1 n=5 on the same trace,
     stopped after --peft-limit seconds (throughput = requests finished / time).
  2. One engine (pallas kernels): every step program compiled first (in parallel), one warm-up window, then
     on the same trace: the base model alone, S1 n=5, S2 n=1000 and 2000 (what the targets read).
     Every run starts with no adapter on the device and lasts until every request has finished (steady
     state: --duration seconds of arrivals above what the engine serves; --drain caps it). Each run keeps
     a record of its steps, so its floor (slora_jax/bench/floors.py) and the byte ceiling of an adapter run
     against the base run come from the work that ran, in the same run.
  3. SLO: the base model at a few rates around its measured throughput; the highest rate at which it
     attains 90% of first tokens within --slo is then served with S2 n=1000 and the "slo" scheduler.
     Then one adapter merged into the weights (--no-merged skips it) and the other S1/S2 runs.
  4. The same S2 n=100 run with the xla kernel backend (a second engine, so a second set of compiles).

Random bf16 weights made on the device; synthetic adapters on q/k/v/o share a few random weight sets on
the host (2,000 distinct 7B-shaped adapters would not fit in host memory) but every adapter name gets its
own device pages, so the copies and the memory traffic are real. JSON of every run goes to --out-dir.
CPU smoke test (minutes): --model tiny --dtype float32 --rate 4 --duration 3 --num-adapters 3,8
--input-range 4 16 --output-range 2 8 --max-batch-size 8 --peft-limit 10 --warmup 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")  # before JAX starts: room for the pool

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SETTINGS = {"S1": (8,), "S2": (64, 32, 16, 8)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-adapters", default="5,100,1000,2000")
    p.add_argument("--settings", default="S1,S2")
    p.add_argument("--rate", type=float, default=50.0, help="req/s of the throughput runs (above capacity)")
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    p.add_argument("--drain", type=float, default=None, help="a run stops this long after its last arrival "
                   "(default: when every request has finished)")
    p.add_argument("--input-range", type=int, nargs=2, default=[8, 512])
    p.add_argument("--output-range", type=int, nargs=2, default=[8, 512])
    p.add_argument("--slo", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--max-prefill-tokens", type=int, default=2048)
    p.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every step program (in parallel) before the warm-up")
    p.add_argument("--budget", type=float, default=None, help="seconds from the start: runs that would end after "
                   "this are skipped (the table and plot are still written)")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds of trace a warm-up window replays; "
                   "windows repeat until one compiles nothing new (0 = no warm-up)")
    p.add_argument("--max-warmup", type=float, default=150.0, help="seconds the warm-up may take at most")
    p.add_argument("--kernel-backends", default="pallas,xla", help="first: every run; others: S2 n=100 only")
    p.add_argument("--peft-limit", type=float, default=55.0, help="seconds the PEFT baseline runs (0 = skip)")
    p.add_argument("--peft-batch-size", type=int, default=8)
    # Above 1.0 too: a 16 s window holds the measured throughput below what base sustains (run 1 attained
    # 100% at 1.0x), and the target reads the highest rate it sustains at 90%.
    p.add_argument("--slo-fractions", default="0.7,1.0,1.4", help="base rates tried, as fractions of its "
                   "measured throughput (empty = skip the SLO stage)")
    p.add_argument("--extra-schedulers", default="", help="also serve S2 n=1000 with these schedulers "
                   "(e.g. cluster,fair)")
    p.add_argument("--merged", action=argparse.BooleanOptionalAction, default=True,
                   help="the merged-adapter baseline (it needs room for a second copy of the weights)")
    p.add_argument("--weight-sets", type=int, default=2)
    p.add_argument("--memory-fraction", type=float, default=0.6,
                   help="share of the device memory left after the weights that the page pool takes")
    p.add_argument("--compile-cache", default=None, help="JAX compilation cache (default: OUT_DIR/jax-cache)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report", action="store_true", help="run nothing: redo the ratio table and the plot from "
                   "OUT_DIR/serving.json (e.g. of a study stopped by a time limit)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- stage 1
def run_peft(args, out_dir: Path) -> dict | None:
    """PEFT in its own process: it must not share the GPU with JAX's preallocated memory."""
    if args.peft_limit <= 0:
        return None
    probe = subprocess.run([sys.executable, "-c", "import torch, transformers, peft; "
                            "print('cuda' if torch.cuda.is_available() else 'cpu')"],
                           capture_output=True, text=True)
    dev = probe.stdout.strip()
    if probe.returncode != 0 or (dev != "cuda" and args.model != "tiny"):
        print(f"[peft] skipped: needs torch with CUDA, transformers and peft ({probe.stderr.strip()[-200:] or dev})")
        return {"skipped": "torch with CUDA, transformers or peft unavailable"}
    out = out_dir / "peft_S1.json"
    cmd = [sys.executable, "-m", "slora_jax.bench.cli", "--model", args.model, "--backend", "peft",
           "--num-adapters", "5", "--ranks", "8", "--targets", ",".join(TARGETS), "--req-rate", str(args.rate),
           "--cv", str(args.cv), "--alpha", str(args.alpha), "--duration", str(args.duration),
           "--input-range", *map(str, args.input_range), "--output-range", *map(str, args.output_range),
           "--slo", str(args.slo), "--seed", str(args.seed), "--dtype", args.dtype,
           "--peft-batch-size", str(args.peft_batch_size), "--time-limit", str(args.peft_limit),
           "--weight-sets", str(args.weight_sets), "--out", str(out), "--no-progress"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the subprocess's JAX (metadata only) stays off the GPU
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.peft_limit + 600)
    print(proc.stdout[-2000:])
    if proc.returncode != 0:
        print(f"[peft] failed:\n{proc.stderr[-3000:]}")
        return {"failed": proc.stderr[-3000:]}
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------- stages 2-4
class Study:
    def __init__(self, args, out_dir: Path, t_start: float):
        from slora_jax.bench.setup import ModelSource, SyntheticAdapters

        self.args, self.out_dir = args, out_dir
        self.source = ModelSource(args.model, args.dtype, seed=args.seed)
        cfg = self.source.config
        self.adapters = {s: SyntheticAdapters(cfg, ranks, TARGETS, args.weight_sets, seed=args.seed, prefix=s)
                         for s, ranks in SETTINGS.items()}
        self.runs: list[dict] = []
        self.skipped: list[str] = []
        self.t_start = t_start  # --budget counts from here
        self.cdfs: dict = {}
        self.ns = [int(x) for x in args.num_adapters.split(",") if x]

    def measure_rates(self, model: str) -> None:
        """Copy bandwidth and matmul rate of this device, for the floors (slora_jax/bench/floors.py)."""
        from slora_jax.bench.floors import copy_bandwidth, matmul_rate

        tiny = model == "tiny"
        bw = copy_bandwidth(64 << 20 if tiny else 2 << 30)
        self.rates = dict(bytes_per_s=bw["bytes_per_s"], bandwidth_method=bw["method"],
                          flops_per_s=matmul_rate(256 if tiny else 8192))
        self.save({"rates": self.rates})

    def econf(self, kernel_backend: str):
        from slora_jax.config import EngineConfig

        a = self.args
        return EngineConfig(dtype=a.dtype, kernel_backend=kernel_backend, max_lora_rank=64,
                            max_batch_size=a.max_batch_size, max_prefill_tokens=a.max_prefill_tokens,
                            max_adapters_on_device=a.max_batch_size + 128, prefetch=True, prefetch_depth=32,
                            slo_first_token_s=a.slo, host_cache_bytes=64 << 30, seed=a.seed,
                            # The longest request of the trace: bounds the decode programs to compile.
                            max_model_len=a.input_range[1] + a.output_range[1],
                            # The merged baseline swaps a second copy of the weights into the running
                            # engine: the pool must leave room for it (a pool sized from free memory OOMed).
                            memory_fraction=a.memory_fraction)

    def trace(self, n: int, rate: float | None = None):
        from slora_jax.bench.trace import synthetic_trace

        a = self.args
        return synthetic_trace(n, a.alpha, rate or a.rate, a.cv, a.duration, a.input_range, a.output_range,
                               seed=a.seed)

    def serve(self, engine, label: str, backend: str, n: int, trace, names, extra: dict) -> dict:
        from slora_jax.bench.harness import run_trace
        from slora_jax.bench.metrics import latency_cdf
        from slora_jax.bench.trace import resolve_adapters

        last = trace[-1].arrival_s if trace else 0.0
        limit = None if self.args.drain is None else last + self.args.drain
        expect = limit if limit is not None else 2 * last + 30  # what a run that drains may take
        if self.args.budget is not None and time.perf_counter() - self.t_start + expect > self.args.budget:
            print(f"[{label}] skipped: it would end past --budget {self.args.budget:.0f} s", flush=True)
            self.skipped.append(label)
            self.save()
            return None
        engine.evict_adapters()  # every run starts cold
        t0 = time.perf_counter()
        steps = engine.record_steps(True)
        try:
            res = run_trace(engine, trace, resolve_adapters(trace, names) if names else [None] * len(trace),
                            time_limit_s=limit, progress=not self.args.no_progress, desc=label)
        finally:
            engine.record_steps(False)
        row = {"label": label, "backend": backend, "num_adapters": n, **extra, **res.summary(self.args.slo),
               "wall_s": time.perf_counter() - t0, "floor": self.floor(engine, steps, extra.get("setting"))}
        self.runs.append(row)
        self.cdfs[label] = {"latency": latency_cdf(res.records, "latency"),
                            "first_token_latency": latency_cdf(res.records, "first_token_latency")}
        loads = row["adapter_loads"]
        print(f"[{label}] {row['throughput_req_s']:.2f} req/s {row['throughput_tok_s']:.0f} tok/s | first token "
              f"avg {_f(row['first_token_latency_avg_s'])} s | SLO {_p(row['slo_attainment'])} | finished "
              f"{row['finished']}/{row['num_requests']} | loads {loads.get('loads')} hidden "
              f"{_p(loads.get('hidden_fraction'))} | host {_p(row['engine'].get('host_overhead_share'))} | "
              f"compiled {row['engine'].get('compiled_shapes')} | {row['wall_s']:.0f} s", flush=True)
        self.save()
        return row

    def floor(self, engine, steps: list, setting) -> dict:
        """The floor of the steps a run took (slora_jax/bench/floors.py), against rates measured at the start."""
        from slora_jax.bench.floors import floor_seconds

        itemsize = 2 if self.args.dtype in ("bfloat16", "float16") else 4
        sizes = {}
        if setting is not None:
            ad = self.adapters[setting]
            sizes = {ad.name(i): ad.nbytes(i, itemsize) for i in range(max(self.ns))}
        out = floor_seconds(steps, engine.model_config, itemsize, sizes, self.rates["bytes_per_s"],
                            self.rates["flops_per_s"])
        out["generated_tokens"] = sum(s["sampled"] for s in steps)  # rows sampled, a few dropped at the end
        return out

    def build(self, kernel_backend: str, precompile: bool):
        t0 = time.perf_counter()
        engine = self.source.engine(self.econf(kernel_backend))
        self.source.release()  # the engine holds its own (fused) copy of the weights
        names = {}
        for s, ad in self.adapters.items():
            if s in self.args.settings.split(","):
                names[s] = ad.register(engine, max(self.ns))
        print(f"[setup] engine ({engine.kernel_backend}) with {sum(len(v) for v in names.values())} adapters, "
              f"{engine.stats()['total_pages']} pages, in {time.perf_counter() - t0:.0f} s", flush=True)
        if precompile:
            t0 = time.perf_counter()
            recs = engine.precompile(sampling=False, on_compiled=lambda r: print(
                f"[precompile] {r['mode']} {r['size']}x{r['width']}: lowered in {r['lower_s']:.1f} s, compiled in "
                f"{r['compile_s']:.1f} s ({time.perf_counter() - t0:.0f} s so far)", flush=True))
            self.save({f"precompile_{engine.kernel_backend}": {"programs": recs, "wall_s": time.perf_counter() - t0}})
        return engine, names

    def warmup(self, engine, names, seconds: float, max_s: float) -> None:
        """Replay ``seconds``-long windows of a trace until a window compiles nothing new (or ``max_s``):
        the timed runs should not pay for compilation."""
        from slora_jax.bench.harness import run_trace
        from slora_jax.bench.trace import TraceRequest, resolve_adapters, synthetic_trace

        if seconds <= 0:
            return
        a = self.args
        s = "S2" if "S2" in names else next(iter(names))
        n = min(100, max(self.ns))
        full = synthetic_trace(n, a.alpha, a.rate, a.cv, max_s + seconds, a.input_range, a.output_range,
                               seed=a.seed + 1)
        t0 = time.perf_counter()
        start = 0.0
        while True:
            window = [TraceRequest(r.arrival_s - start, r.adapter, r.input_len, r.output_len) for r in full
                      if start <= r.arrival_s < start + seconds]
            before = engine.stats()["compiled_shapes"]
            run_trace(engine, window, resolve_adapters(window, names[s][:n]),
                      time_limit_s=seconds + a.drain, progress=not a.no_progress, desc="warmup")
            new = engine.stats()["compiled_shapes"] - before
            start += seconds
            print(f"[warmup] window of {len(window)} requests compiled {new} new programs "
                  f"({time.perf_counter() - t0:.0f} s so far)", flush=True)
            if new == 0 or time.perf_counter() - t0 > max_s or start >= max_s:
                break

    def _settings_runs(self, names) -> list[tuple[str, int]]:
        """(setting, n) of every S-LoRA run, those the issue's targets read first (S1 n=5 against PEFT,
        S2 at n = 1000 and 2000 against the base model), so a --budget cuts the least needed."""
        want = [("S1", 5), ("S2", 1000), ("S2", 2000)]
        every = [(s, n) for s in names for n in self.ns]
        return [x for x in want if x in every] + [x for x in every if x not in want]

    def core_runs(self, engine, names) -> None:
        from slora_jax.bench.trace import with_base_model

        kb = engine.kernel_backend
        base_trace = with_base_model(self.trace(max(self.ns)))
        self.serve(engine, f"base[{kb}]", "base", 0, base_trace, None, {**self._common(kb), "ranks_label": "-"})
        for s, n in self._settings_runs(names)[:3]:
            self._slora(engine, names, s, n)

    def _common(self, kb: str) -> dict:
        return {"kernel_backend": kb, "scheduler": "fcfs", "req_rate": self.args.rate}

    def _slora(self, engine, names, s: str, n: int) -> None:
        self.serve(engine, f"{s} n={n} [{engine.kernel_backend}]", "slora", n, self.trace(n), names[s][:n],
                   {**self._common(engine.kernel_backend), "setting": s, "ranks_label": ",".join(map(str, SETTINGS[s]))})

    def other_runs(self, engine, names) -> None:
        from slora_jax.bench.merged import merged_into
        from slora_jax.bench.trace import with_base_model

        kb = engine.kernel_backend
        common = self._common(kb)
        first = next(iter(names))
        if self.args.merged:
            with merged_into(engine, self.adapters[first].weights(0)):
                self.serve(engine, f"merged[{kb}]", "merged", 1, with_base_model(self.trace(max(self.ns))), None,
                           {**common, "ranks_label": str(self.adapters[first].ranks[0])})
        for s, n in self._settings_runs(names)[3:]:
            self._slora(engine, names, s, n)
        s = "S2" if "S2" in names else next(iter(names))
        n = 1000 if 1000 in self.ns else max(self.ns)
        for sched_name in [x for x in self.args.extra_schedulers.split(",") if x]:
            self.with_policy(engine, sched_name, lambda: self.serve(
                engine, f"{s} n={n} {sched_name} [{kb}]", f"slora-{sched_name}", n, self.trace(n), names[s][:n],
                {**common, "scheduler": sched_name, "setting": s, "ranks_label": ",".join(map(str, SETTINGS[s]))}))

    def with_policy(self, engine, name: str, fn):
        """Run ``fn`` with the engine's scheduling policy swapped for ``name`` (between runs)."""
        old = (engine.config.scheduler, engine.config.slo_first_token_s)
        engine.set_scheduler(name, slo_first_token_s=self.args.slo)
        try:
            return fn()
        finally:
            engine.set_scheduler(old[0], slo_first_token_s=old[1])

    def slo_runs(self, engine, names) -> None:
        from slora_jax.bench.trace import with_base_model

        fr = [float(x) for x in self.args.slo_fractions.split(",") if x]
        base = next((r for r in self.runs if r["backend"] == "base"), None)
        if not fr or base is None:
            return
        kb = engine.kernel_backend
        cap = base["throughput_req_s"]
        best = None
        for f in fr:
            rate = max(cap * f, 0.1)
            row = self.serve(engine, f"base rate={rate:.1f} [{kb}]", "base-slo", 0,
                             with_base_model(self.trace(1, rate)), None,
                             {"kernel_backend": kb, "scheduler": "fcfs", "req_rate": rate, "ranks_label": "-"})
            if row is not None and row["slo_attainment"] >= 0.9:
                best = rate
        if best is None:
            print("[slo] the base model reached 90% SLO attainment at none of the rates tried")
            return
        s = "S2" if "S2" in names else next(iter(names))
        n = 1000 if 1000 in self.ns else max(self.ns)
        self.with_policy(engine, "slo", lambda: self.serve(
            engine, f"{s} n={n} slo rate={best:.1f} [{kb}]", "slora-slo", n, self.trace(n, best), names[s][:n],
            {"kernel_backend": kb, "scheduler": "slo", "req_rate": best, "setting": s,
             "ranks_label": ",".join(map(str, SETTINGS[s]))}))

    def save(self, extra: dict | None = None) -> None:
        self.results = getattr(self, "results", {})
        if extra:
            self.results.update(extra)
        self.results["runs"] = self.runs
        self.results["skipped"] = self.skipped
        # Latency CDFs (rounded) go in too, so --report can redraw the plot of a run cut short.
        self.results["cdfs"] = {label: {k: [np.round(np.asarray(a, float), 4).tolist() for a in xy]
                                        for k, xy in c.items()} for label, c in self.cdfs.items()}
        (self.out_dir / "serving.json").write_text(json.dumps(self.results, indent=2, default=str))


def ratio_table(runs: list[dict], peft: dict | None, slo: float) -> list[tuple]:
    """(target, measured, met?) rows of the issue's targets, from this run's numbers."""
    by = {r["label"]: r for r in runs}
    base = next((r for r in runs if r["backend"] == "base"), None)
    rows = []

    def thr(label):
        r = by.get(label)
        return None if r is None else r["throughput_req_s"]

    kb = base["kernel_backend"] if base else None
    b = base["throughput_req_s"] if base else None
    for n, want in ((1000, 0.9), (2000, 0.85)):
        t = thr(f"S2 n={n} [{kb}]")
        v = t / b if (t is not None and b) else None
        rows.append((f"S2 n={n} / base throughput >= {want}", v, None if v is None else v >= want))
        # Tokens generated by every request (finished or not) per second of engine steps: less biased than
        # finished requests by a run that ends before the longest requests do.
        r = by.get(f"S2 n={n} [{kb}]")
        if r is not None and base is not None:
            rows.append((f"S2 n={n} / base generated tokens per engine second (info)",
                         _tok_rate(r) / _tok_rate(base) if _tok_rate(base) else None, None))
            # The byte ceiling of this pair of runs: the ratio of their floor throughputs, each from the steps
            # it ran; the tokens/s ratio should reach 0.95 of it.
            tok = r["throughput_tok_s"] / base["throughput_tok_s"] if base["throughput_tok_s"] else None
            ceil = _ceiling(r, base)
            rows.append((f"S2 n={n} / base tokens/s (info)", tok, None))
            rows.append((f"S2 n={n} byte ceiling vs base, same run (info)", ceil, None))
            v = tok / ceil if (tok is not None and ceil) else None
            rows.append((f"S2 n={n} tokens/s ratio / its byte ceiling >= 0.95", v, None if v is None else v >= 0.95))
    merged = next((r for r in runs if r["backend"] == "merged"), None)
    if merged and b:
        rows.append(("merged / base throughput (info)", merged["throughput_req_s"] / b, None))
    p = None
    if peft and "runs" in peft and peft["runs"]:
        p = peft["runs"][0]["throughput_req_s"]
    t = thr(f"S1 n=5 [{kb}]")
    v = t / p if (t is not None and p) else None
    rows.append(("S1 n=5 / PEFT throughput >= 30", v, None if v is None else v >= 30))
    s = next((r for r in runs if r["backend"] == "slora-slo"), None)
    rows.append((f"SLO attainment at base's 90% rate ({s['label'] if s else 'S2 n=1000, slo'}) >= 0.9",
                 None if s is None else s["slo_attainment"], None if s is None else s["slo_attainment"] >= 0.9))
    big = [r["adapter_loads"] for r in runs if r["backend"] == "slora" and r["num_adapters"] >= 100]
    for key, what in (("hidden_fraction", "all loads"), ("hidden_fraction_busy", "loads while busy")):
        fr = [x[key] for x in big if x.get(key) is not None]
        v = min(fr) if fr else None
        rows.append((f"adapter loads hidden, {what} (min over n >= 100) >= 0.95", v,
                     None if v is None else v >= 0.95))
    x = next((r for r in runs if r["backend"] == "slora" and r["kernel_backend"] == "xla"
              and r["label"].startswith("S2 n=100 ")), None)
    pl = thr(f"S2 n=100 [{kb}]") if kb != "xla" else None
    if x and pl is not None:
        # The xla backend may finish nothing inside the window; its generated tokens still compare.
        rows.append((f"S2 n=100 {kb} / xla throughput (info)",
                     pl / x["throughput_req_s"] if x["throughput_req_s"] else None, None))
        r = by.get(f"S2 n=100 [{kb}]")
        rows.append((f"S2 n=100 {kb} / xla generated tokens per engine second (info)",
                     _tok_rate(r) / _tok_rate(x) if _tok_rate(x) else None, None))
    hs = [r["engine"].get("host_overhead_share") for r in runs if r["backend"] == "slora"]
    if hs:
        rows.append(("host overhead share (max over S-LoRA runs, info)", max(hs), None))
    return rows


def _ceiling(run: dict, base: dict) -> float | None:
    """Floor throughput (tokens per floor second) of ``run`` over that of ``base``."""
    f, fb = run.get("floor") or {}, base.get("floor") or {}
    if not f.get("floor_s") or not fb.get("floor_s") or not fb.get("generated_tokens"):
        return None
    return (f["generated_tokens"] / f["floor_s"]) / (fb["generated_tokens"] / fb["floor_s"])


def _tok_rate(run: dict) -> float:
    e = run.get("engine") or {}
    return e.get("generated_tokens", 0) / e["step_time_s"] if e.get("step_time_s") else 0.0


def _f(x, d=2):
    return "-" if x is None else f"{x:.{d}f}"


def _p(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.report:
        results = json.loads((out_dir / "serving.json").read_text())
        peft_file = out_dir / "peft_S1.json"
        peft = results.get("peft") or (json.loads(peft_file.read_text()) if peft_file.exists() else None)
        report(out_dir, results, peft, (results.get("settings") or {}).get("slo", args.slo))
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    peft = run_peft(args, out_dir)

    import jax

    jax.config.update("jax_compilation_cache_dir", args.compile_cache or str(out_dir / "jax-cache"))
    dev = jax.devices()[0]
    study = Study(args, out_dir, t_start)
    study.measure_rates(args.model)
    study.save({"meta": {"device": str(getattr(dev, "device_kind", dev)), "platform": dev.platform,
                         "jax": jax.__version__, "command": " ".join(["python", "benchmarks/serving.py"]
                                                                      + list(argv if argv is not None
                                                                             else sys.argv[1:])),
                         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                "settings": vars(args), "peft": peft})
    kernels = [k for k in args.kernel_backends.split(",") if k]
    for i, kb in enumerate(kernels):
        if i and args.budget is not None and time.perf_counter() - t_start > args.budget - 120:
            print(f"[{kb}] skipped: too little of --budget left for a second engine", flush=True)
            study.skipped.append(f"engine [{kb}]")
            continue
        # Every backend's timed runs must not pay for compilation, the second backend's included.
        engine, names = study.build(kb, args.precompile)
        study.warmup(engine, names, args.warmup, args.max_warmup if i == 0 else args.max_warmup / 2)
        if i == 0:
            study.core_runs(engine, names)
            study.slo_runs(engine, names)
            study.other_runs(engine, names)
        elif "S2" in names and 100 in study.ns:
            study.serve(engine, f"S2 n=100 [{engine.kernel_backend}]", "slora", 100, study.trace(100),
                        names["S2"][:100], {"kernel_backend": engine.kernel_backend, "scheduler": "fcfs",
                                            "req_rate": args.rate, "setting": "S2", "ranks_label": "64,32,16,8"})
        del engine
        gc.collect()
    study.save({"wall_s": time.perf_counter() - t_start})
    report(out_dir, study.results, peft, args.slo)
    print(f"\nwall {time.perf_counter() - t_start:.0f} s; results in {out_dir}")
    return 0


def report(out_dir: Path, results: dict, peft: dict | None, slo: float) -> None:
    """The issue's ratio table (into serving.json too), the plot and the printed tables, from saved runs."""
    runs = results.get("runs", [])
    rows = ratio_table(runs, peft, slo)
    results["ratios"] = [{"target": t, "measured": v, "met": m} for t, v, m in rows]
    (out_dir / "serving.json").write_text(json.dumps(results, indent=2, default=str))
    from slora_jax.bench.plots import plot_results
    all_runs = list(runs) + ([dict(peft["runs"][0], label="peft S1 n=5")] if peft and peft.get("runs") else [])
    cdfs = {k: {w: tuple(np.asarray(a) for a in xy) for w, xy in c.items()}
            for k, c in results.get("cdfs", {}).items() if "rate=" not in k}
    plot_results({"runs": [r for r in all_runs if r["backend"] in ("slora", "base", "merged", "peft")]}, cdfs,
                 out_dir / "serving.png")
    print(f"\n{'run':<34}{'req/s':>8}{'tok/s':>9}{'1st tok':>9}{'lat avg':>9}{'SLO':>6}{'hidden':>8}{'host':>6}")
    for r in all_runs:
        loads = r.get("adapter_loads") or {}
        print(f"{r['label'][:33]:<34}{r['throughput_req_s']:>8.2f}{r['throughput_tok_s']:>9.0f}"
              f"{_f(r['first_token_latency_avg_s']):>9}{_f(r['latency_avg_s']):>9}{_p(r['slo_attainment']):>6}"
              f"{_p(loads.get('hidden_fraction')):>8}{_p((r.get('engine') or {}).get('host_overhead_share')):>6}")
    print(f"\n{'target':<70}{'measured':>10}  met")
    for t, v, m in rows:
        print(f"{t:<70}{_f(v, 3):>10}  {'-' if m is None else ('yes' if m else 'NO')}")


if __name__ == "__main__":
    sys.exit(main())
