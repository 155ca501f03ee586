"""``slora-jax bench``: the S-LoRA synthetic-workload benchmark and its baselines, in one run.

    slora-jax bench --model llama-2-7b --num-adapters 5 100 1000 --alpha 1 --req-rate 20 --cv 1 \
        --duration 60 --input-range 8 512 --output-range 8 512 --slo 6 --ranks 8,16,32,64 \
        --backend slora,base,merged,peft --kernel-backend pallas,xla --out results.json

For each kernel backend an engine is built once; every S-LoRA run (one per --num-adapters value) replays the
trace against it with that many adapters, cold (no adapter resident at the start). Baselines on the same
trace: ``base`` (every request on the base model), ``merged`` (the first adapter merged into the weights),
``peft`` (transformers + PEFT, static batches of one adapter). The JSON holds every metric of every run, and
ratios against the baselines; a PNG (throughput vs adapters, latency CDFs) is written beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from slora_jax.bench import trace as tr
from slora_jax.bench.metrics import latency_cdf
from slora_jax.bench.setup import (DEFAULT_TARGETS, ModelSource, SyntheticAdapters, adapter_folders, parse_ranks,
                                   parse_targets, register_folders)
from slora_jax.errors import ConfigError, SloraError

BACKENDS = ("slora", "base", "merged", "peft")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slora-jax bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, or a named shape with random weights "
                   "(tiny, llama-2-7b, llama-2-13b, llama-3-8b)")
    w = p.add_argument_group("workload (S-LoRA's synthetic trace)")
    w.add_argument("--num-adapters", type=int, nargs="+", default=[100], metavar="N",
                   help="adapters in the trace; several values run one after the other on the same engine")
    w.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity (1 = uniform)")
    w.add_argument("--req-rate", type=float, default=2.0, help="requests per second")
    w.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the Gamma arrival gaps")
    w.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    w.add_argument("--input-range", type=int, nargs=2, default=[8, 512], metavar=("A", "B"),
                   help="prompt lengths, uniform in [A, B)")
    w.add_argument("--output-range", type=int, nargs=2, default=[8, 512], metavar=("A", "B"),
                   help="output lengths, uniform in [A, B)")
    w.add_argument("--seed", type=int, default=42)
    w.add_argument("--trace", default=None, help="replay a JSONL trace instead (arrival_s, adapter, input_len, "
                   "output_len per line)")
    w.add_argument("--save-trace", default=None, help="write the (first) trace as JSONL")
    a = p.add_argument_group("adapters")
    a.add_argument("--adapter-dir", default=None, help="folder of PEFT adapter folders, registered lazily "
                   "(default: synthetic random adapters)")
    a.add_argument("--ranks", default="8,16,32,64", help="ranks of the synthetic adapters, assigned round-robin")
    a.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="projections the synthetic adapters adapt")
    a.add_argument("--weight-sets", type=int, default=2, help="distinct random weight sets per rank that the "
                   "synthetic adapters share on the host (each adapter still has its own device pages)")
    e = p.add_argument_group("engine")
    e.add_argument("--backend", default="slora", help=f"comma-separated systems to run: {', '.join(BACKENDS)}")
    e.add_argument("--kernel-backend", default="auto", help="comma-separated: auto, xla, pallas")
    e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    e.add_argument("--scheduler", default="fcfs", choices=["fcfs", "cluster", "slo", "fair"])
    e.add_argument("--slo", type=float, default=6.0, help="first-token SLO in seconds (metrics; the slo scheduler)")
    e.add_argument("--cluster-k", type=int, default=4)
    e.add_argument("--admission", default="optimistic", choices=["optimistic", "reserve"])
    e.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True)
    e.add_argument("--prefetch-depth", type=int, default=16)
    e.add_argument("--max-batch-size", type=int, default=64)
    e.add_argument("--max-prefill-tokens", type=int, default=2048)
    e.add_argument("--num-pages", type=int, default=None)
    e.add_argument("--memory-fraction", type=float, default=None,
                   help="share of the free device memory the page pool takes without --num-pages")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's); bounds the decode programs compiled")
    e.add_argument("--max-adapters-on-device", type=int, default=None,
                   help="device adapter slots (default: max batch size + prefetch depth)")
    e.add_argument("--host-cache-gb", type=float, default=8.0, help="bound of adapter weights in host memory")
    e.add_argument("--max-lora-rank", type=int, default=None, help="default: the largest of --ranks")
    e.add_argument("--peft-batch-size", type=int, default=8)
    e.add_argument("--peft-device", default=None, help="torch device of the peft baseline (default: cuda if any)")
    o = p.add_argument_group("run")
    o.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile every step program before the runs (default: on GPU)")
    o.add_argument("--warmup", type=float, default=5.0, help="seconds of the trace replayed first and discarded "
                   "(compiles the step programs); 0 = none")
    o.add_argument("--time-limit", type=float, default=None, help="per run: stop after this many seconds and "
                   "count what is left as unfinished")
    o.add_argument("--out", default="bench.json", help="results JSON")
    o.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--compile-cache", default=None, help="JAX persistent compilation cache folder")
    return p


def _list(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ConfigError(f"{flag} must be a comma-separated subset of {', '.join(allowed)}, got {text!r}")
    return list(dict.fromkeys(items))


def engine_config(args, kernel_backend: str, ranks: Sequence[int]):
    from slora_jax.config import EngineConfig

    max_rank = args.max_lora_rank or max(ranks)
    slots = args.max_adapters_on_device or (args.max_batch_size + args.prefetch_depth)
    return EngineConfig(
        dtype=args.dtype, kernel_backend=kernel_backend, max_lora_rank=max_rank, num_pages=args.num_pages,
        max_batch_size=args.max_batch_size, max_prefill_tokens=args.max_prefill_tokens,
        max_model_len=args.max_model_len, max_adapters_on_device=slots, scheduler=args.scheduler, admission=args.admission,
        cluster_k=args.cluster_k, slo_first_token_s=args.slo, prefetch=args.prefetch,
        prefetch_depth=args.prefetch_depth, host_cache_bytes=int(args.host_cache_gb * (1 << 30)), seed=args.seed,
        **({} if args.memory_fraction is None else {"memory_fraction": args.memory_fraction}))


def _meta(argv) -> dict:
    import jax

    dev = jax.devices()[0]
    return {"device": str(getattr(dev, "device_kind", dev)), "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version(), "host": platform.node(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "slora-jax bench " + " ".join(argv)}


class Bench:
    """Runs of one `slora-jax bench` invocation, collected into one results dict."""

    def __init__(self, args, argv: Sequence[str]):
        self.args = args
        self.argv = list(argv)
        self.runs: list[dict] = []
        self.cdfs: dict = {}
        self.ranks = parse_ranks(args.ranks)
        self.targets = parse_targets(args.targets)
        self.backends = _list(args.backend, BACKENDS, "--backend")
        self.kernels = _list(args.kernel_backend, ("auto", "xla", "pallas"), "--kernel-backend")
        self.progress = not args.no_progress
        if args.trace:
            self.base_trace = tr.read_trace(args.trace)
        else:
            self.base_trace = None
        self.source = ModelSource(args.model, args.dtype, seed=args.seed)
        self.synthetic = SyntheticAdapters(self.source.config, self.ranks, self.targets, args.weight_sets,
                                           seed=args.seed)
        self.folders = adapter_folders(args.adapter_dir) if args.adapter_dir else None

    # ------------------------------------------------------------------ traces and adapter names
    def trace_for(self, n: int) -> list:
        a = self.args
        if self.base_trace is not None:
            return list(self.base_trace)
        return tr.synthetic_trace(n, a.alpha, a.req_rate, a.cv, a.duration, a.input_range, a.output_range,
                                  seed=a.seed)

    def check_context(self) -> None:
        """Refuse, before any run, a workload whose requests do not fit the model's context: the engine would
        refuse or cut each of them, and the results would count them as aborted."""
        a = self.args
        context = a.max_model_len or self.source.config.max_position_embeddings
        for n in a.num_adapters:
            trace = self.trace_for(n)
            over = [r.input_len + r.output_len for r in trace if r.input_len + r.output_len > context]
            if over:
                fix = "shorten the trace's requests" if self.base_trace is not None else \
                    (f"lower --input-range {a.input_range[0]} {a.input_range[1]} and --output-range "
                     f"{a.output_range[0]} {a.output_range[1]} so that their largest values add up to at most "
                     f"{context}")
                raise ConfigError(f"{len(over)} of {len(trace)} requests are longer than the model's context of "
                                  f"{context} tokens (up to {max(over)} tokens, input + output): {fix}, or use a "
                                  f"model with a longer context")

    def adapter_count(self, trace, n: int) -> int:
        refs = [r.adapter for r in trace if r.adapter is not None]
        if self.base_trace is None:
            return n
        ints = [x for x in refs if isinstance(x, int)]
        return max([x + 1 for x in ints] + [len({x for x in refs if isinstance(x, str)})] + [0])

    def names_for(self, engine, trace, n: int) -> list[str]:
        """Register (if needed) and return the adapter list the trace's indices refer to."""
        str_names = list(dict.fromkeys(r.adapter for r in trace if isinstance(r.adapter, str)))
        if self.folders is not None:
            if str_names:
                by_name = {f.name: f for f in self.folders}
                missing = [x for x in str_names if x not in by_name]
                if missing:
                    raise ConfigError(f"trace names adapter(s) {missing[:5]} not found in --adapter-dir")
                return register_folders(engine, [by_name[x] for x in str_names], len(str_names), names=str_names)
            return register_folders(engine, self.folders, n)
        if str_names:
            for i, name in enumerate(str_names):
                if not engine.has_adapter(name):
                    engine.load_adapter_weights(name, self.synthetic.weights(i))
            return str_names
        return self.synthetic.register(engine, n)

    # ------------------------------------------------------------------ one run
    def record(self, label: str, backend: str, n: int, result, extra: dict) -> dict:
        summary = result.summary(self.args.slo)
        row = {"label": label, "backend": backend, "num_adapters": n, **extra, **summary}
        self.runs.append(row)
        self.cdfs[label] = {"latency": latency_cdf(result.records, "latency"),
                            "first_token_latency": latency_cdf(result.records, "first_token_latency")}
        if self.progress:
            print(f"[{label}] {row['throughput_req_s']:.2f} req/s  {row['throughput_tok_s']:.0f} tok/s  "
                  f"first token {_fmt(row['first_token_latency_avg_s'])} s  SLO {_pct(row['slo_attainment'])}  "
                  f"finished {row['finished']}/{row['num_requests']}", flush=True)
        return row

    def _common(self, kernel_backend: Optional[str]) -> dict:
        a = self.args
        return {"kernel_backend": kernel_backend, "scheduler": a.scheduler, "req_rate": a.req_rate, "cv": a.cv,
                "alpha": a.alpha, "duration_s": a.duration, "ranks_label": ",".join(map(str, self.ranks)),
                "prefetch": a.prefetch, "admission": a.admission}

    def run_engine_backends(self) -> None:
        from slora_jax.bench.harness import run_trace
        from slora_jax.bench.merged import merged_into
        from slora_jax.engine.engine import precompile_wanted

        a = self.args
        jax_backends = [b for b in self.backends if b != "peft"]
        if not jax_backends:
            return
        first_kernel = True
        for kb in self.kernels:
            engine = self.source.engine(engine_config(a, kb, self.ranks))
            kname = engine.kernel_backend
            common = {**self._common(kname)}
            if precompile_wanted(a.precompile):
                recs = engine.precompile(sampling=False)
                if self.progress:
                    print(f"[precompile {kname}] {len(recs)} programs, longest "
                          f"{max((r['compile_s'] for r in recs), default=0):.1f} s", flush=True)
            if a.warmup > 0:
                n0 = a.num_adapters[0]
                t = self.trace_for(n0)
                t = [r for r in t if r.arrival_s <= a.warmup] or t[:1]
                names = self.names_for(engine, t, self.adapter_count(t, n0))
                run_trace(engine, t, tr.resolve_adapters(t, names), progress=self.progress,
                          desc=f"warmup [{kname}]", time_limit_s=a.warmup * 4 + 30)
                engine.evict_adapters()
            if first_kernel and "base" in jax_backends:
                t = tr.with_base_model(self.trace_for(a.num_adapters[0]))
                res = run_trace(engine, t, [None] * len(t), time_limit_s=a.time_limit, progress=self.progress,
                                desc=f"base [{kname}]")
                self.record(f"base[{kname}]", "base", 0, res, common)
            if first_kernel and "merged" in jax_backends:
                t = tr.with_base_model(self.trace_for(a.num_adapters[0]))
                lora = self._first_lora(engine)
                with merged_into(engine, lora):
                    res = run_trace(engine, t, [None] * len(t), time_limit_s=a.time_limit,
                                    progress=self.progress, desc=f"merged [{kname}]")
                self.record(f"merged[{kname}]", "merged", 1, res, {**common, "merged_rank": int(lora.rank)})
            if "slora" in jax_backends:
                for n in a.num_adapters:
                    t = self.trace_for(n)
                    names = self.names_for(engine, t, self.adapter_count(t, n))
                    engine.evict_adapters()  # every run starts cold
                    res = run_trace(engine, t, tr.resolve_adapters(t, names), time_limit_s=a.time_limit,
                                    progress=self.progress, desc=f"slora n={n} [{kname}]")
                    self.record(f"slora[{kname}] n={len(names)}", "slora", len(names), res, common)
            first_kernel = False
            del engine

    def _first_lora(self, engine):
        if self.folders is not None:
            from slora_jax.adapters.peft import load_peft_adapter
            return load_peft_adapter(self.folders[0], self.source.config, self.args.max_lora_rank or max(self.ranks),
                                     self.folders[0].name)
        return self.synthetic.weights(0)

    def run_peft(self) -> None:
        if "peft" not in self.backends:
            return
        from slora_jax.bench.peft_baseline import PeftBaseline, build_hf_model, torch_device

        a = self.args
        if self.folders is not None:
            raise ConfigError("--backend peft runs on synthetic adapters; drop --adapter-dir for it")
        dev = torch_device(a.peft_device)
        dtype = a.dtype
        model = build_hf_model(self.source.config, self.source.model_dir, dtype, dev, seed=a.seed)
        for n in a.num_adapters:
            t = self.trace_for(n)
            count = self.adapter_count(t, n)
            str_names = list(dict.fromkeys(r.adapter for r in t if isinstance(r.adapter, str)))
            names = str_names or [self.synthetic.name(i) for i in range(count)]
            loras = {name: self.synthetic.weights(i) for i, name in enumerate(names)}
            server = PeftBaseline(model, self.source.config, loras, batch_size=a.peft_batch_size)
            res = server.run(t, tr.resolve_adapters(t, names), time_limit_s=a.time_limit, progress=self.progress,
                             desc=f"peft n={count}")
            self.record(f"peft n={count}", "peft", count, res,
                        {**self._common(None), "peft_device": dev, "peft_batch_size": a.peft_batch_size})
            model = server.unload()  # the plain base model again, for the next n
            del server
        del model
        _free_torch(dev)  # before JAX takes the same GPU

    # ------------------------------------------------------------------ results
    def results(self) -> dict:
        a = self.args
        first = self.trace_for(a.num_adapters[0])
        out = {"meta": _meta(self.argv), "settings": {k: v for k, v in vars(a).items()},
               "trace": {"num_requests": len(first), "req_rate": a.req_rate, "cv": a.cv, "alpha": a.alpha,
                         "duration_s": a.duration, "input_range": list(a.input_range),
                         "output_range": list(a.output_range), "seed": a.seed, "replayed": a.trace},
               "runs": self.runs}
        out["ratios"] = ratios(self.runs)
        return out


def _free_torch(device: str) -> None:
    import gc
    gc.collect()
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.empty_cache()


def ratios(runs: Sequence[dict]) -> dict:
    """S-LoRA's throughput against each baseline run on the same trace, and pallas against xla."""
    base = next((r for r in runs if r["backend"] == "base"), None)
    merged = next((r for r in runs if r["backend"] == "merged"), None)
    peft = {r["num_adapters"]: r for r in runs if r["backend"] == "peft"}
    by_kernel: dict = {}
    out: dict = {"rows": []}
    for r in runs:
        if r["backend"] != "slora":
            continue
        row = {"label": r["label"], "num_adapters": r["num_adapters"], "kernel_backend": r["kernel_backend"],
               "throughput_req_s": r["throughput_req_s"]}
        if base and base["throughput_req_s"]:
            row["vs_base"] = r["throughput_req_s"] / base["throughput_req_s"]
        if merged and merged["throughput_req_s"]:
            row["vs_merged"] = r["throughput_req_s"] / merged["throughput_req_s"]
        p = peft.get(r["num_adapters"])
        if p and p["throughput_req_s"]:
            row["vs_peft"] = r["throughput_req_s"] / p["throughput_req_s"]
        row["loads_hidden_fraction"] = r["adapter_loads"].get("hidden_fraction")
        row["slo_attainment"] = r["slo_attainment"]
        out["rows"].append(row)
        by_kernel.setdefault(r["num_adapters"], {})[r["kernel_backend"]] = r["throughput_req_s"]
    out["pallas_vs_xla"] = {str(n): k["pallas"] / k["xla"] for n, k in by_kernel.items()
                            if k.get("pallas") and k.get("xla")}
    return out


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def print_table(results: dict, file=sys.stdout) -> None:
    rows = results["runs"]
    rat = {r["label"]: r for r in results["ratios"]["rows"]}
    head = (f"{'run':<26}{'req/s':>8}{'tok/s':>9}{'lat avg':>9}{'p99':>8}{'1st tok':>9}{'SLO':>6}{'satisf':>8}"
            f"{'abort':>7}{'hidden':>8}{'host':>6}{'vs base':>9}{'vs peft':>9}")
    print(head, file=file)
    for r in rows:
        x = rat.get(r["label"], {})
        loads = r.get("adapter_loads") or {}
        host = (r.get("engine") or {}).get("host_overhead_share")
        print(f"{r['label'][:25]:<26}{r['throughput_req_s']:>8.2f}{r['throughput_tok_s']:>9.0f}"
              f"{_fmt(r['latency_avg_s']):>9}{_fmt(r['latency_p99_s']):>8}{_fmt(r['first_token_latency_avg_s']):>9}"
              f"{_pct(r['slo_attainment']):>6}{_fmt(r['user_satisfaction']):>8}{r['aborted'] + r['unfinished']:>7}"
              f"{_pct(loads.get('hidden_fraction')):>8}{_pct(host):>6}{_fmt(x.get('vs_base')):>9}"
              f"{_fmt(x.get('vs_peft'), 1):>9}", file=file)
    pv = results["ratios"].get("pallas_vs_xla")
    if pv:
        print("pallas/xla throughput: " + ", ".join(f"n={k}: {v:.2f}" for k, v in pv.items()), file=file)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.compile_cache:
        import jax
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    try:
        bench = Bench(args, argv)
        bench.check_context()
        if args.save_trace:
            tr.write_trace(args.save_trace, bench.trace_for(args.num_adapters[0]))
        t0 = time.perf_counter()
        bench.run_peft()  # first: torch and JAX should not hold the same GPU at once
        bench.run_engine_backends()
        results = bench.results()
        results["meta"]["wall_s"] = time.perf_counter() - t0
    except SloraError as e:
        print(f"slora-jax bench: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=_json_default))
    from slora_jax.bench.plots import plot_results
    png = plot_results(results, bench.cdfs, args.plot or out.with_suffix(".png"))
    print_table(results)
    print(f"results: {out}" + (f"  plot: {png}" if png else "  (no plot: matplotlib is not installed)"))
    return 0


def _json_default(x):
    try:
        import numpy as np
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    if isinstance(x, (Path, os.PathLike)):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
    sys.exit(main())
