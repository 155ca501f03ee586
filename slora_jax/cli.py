"""Command line: ``slora-jax demo | serve | bench`` (also ``python -m slora_jax``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _demo_args(sub):
    p = sub.add_parser("demo", help="serve a mixed-adapter batch on a small random model made on the fly")
    p.add_argument("--cache-dir", default=None, help="where the demo checkpoint and adapters are written "
                   "(default: ~/.cache/slora-jax/demo)")
    p.add_argument("--requests", type=int, default=12, help="requests in the mixed batch")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kernel-backend", default="auto", choices=["auto", "xla", "pallas"])
    return p


def _serve_args(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="adapter to load at start")
    p.add_argument("--adapter-root", default=None, help="runtime adapter loading only from under this folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--kernel-backend", default="auto", choices=["auto", "xla", "pallas"])
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--memory-fraction", type=float, default=None,
                   help="share of the device memory free after the weights that the page pool takes, when "
                        "--num-pages is not given (default: EngineConfig's)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prompt tokens admitted in one prefill step (default: EngineConfig's)")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile every step program before binding (default: on GPU, where compiling a step "
                        "program on demand stalls the requests in flight for seconds)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (413 beyond)")
    p.add_argument("--max-pending", type=int, default=4096, help="requests in flight before 429")
    p.add_argument("--max-waiting", type=int, default=100_000, help="engine queue bound (429 beyond)")
    from slora_jax.server.flags import add_serving_limits
    add_serving_limits(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its options belong to the bench's own parser
        rest = argv[1:]
        if "--mode" in rest:
            i = rest.index("--mode")
            mode = rest[i + 1] if i + 1 < len(rest) else ""
            rest = rest[:i] + rest[i + 2:]
            if mode not in ("serving", "offline"):
                print(f"slora-jax bench: --mode must be 'serving' (the default) or 'offline', got {mode!r}",
                      file=sys.stderr)
                return 2
            if mode == "offline":  # vLLM's benchmark_throughput convention: every request handed over at once
                from slora_jax.bench.offline import main as offline_main
                return offline_main(rest)
        from slora_jax.bench.cli import main as bench_main
        return bench_main(rest)
    parser = argparse.ArgumentParser(prog="slora-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_args(sub)
    _serve_args(sub)
    sub.add_parser("bench", help="S-LoRA synthetic-workload benchmark (slora-jax bench --help); --mode offline: "
                   "offline throughput beside its floor (slora-jax bench --mode offline --help)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from slora_jax.demo import run_demo
        return run_demo(args)
    if args.command == "serve":
        from slora_jax.server.app import run_server
        return run_server(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
