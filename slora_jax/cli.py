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


class _DefaultsHelp(argparse.HelpFormatter):
    """Appends each flag's default to its help, unless the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default in (None, [], argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _serve_args(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                       description="OpenAI-compatible HTTP server over one base model and many LoRA adapters "
                                   "(vLLM's adapter routes and flag names where they exist).",
                       formatter_class=_DefaultsHelp)
    model = p.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="DIR",
                       help="Hugging Face checkpoint folder (config.json + *.safetensors [+ tokenizer.json])")
    model.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="the `model` value that means the base model (default: the --model folder's name)")
    model.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="folder with tokenizer.json [+ tokenizer_config.json] (default: the --model folder)")
    model.add_argument("--chat-template", default=None, metavar="FILE",
                       help="Jinja chat template file (default: the tokenizer's, from tokenizer_config.json "
                            "or chat_template.jinja)")
    model.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="weights and activations; auto (the default) is float32 on a CPU, where bfloat16 "
                            "arithmetic is emulated, and bfloat16 on a GPU")
    model.add_argument("--max-model-len", type=int, default=None, metavar="N",
                       help="context length (default: the model's)")
    model.add_argument("--seed", type=int, default=0, metavar="N",
                       help="seeds the engine's sampling of requests that give no seed")

    adapters = p.add_argument_group("adapters")
    adapters.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                          help="PEFT adapter folder to load at start (repeatable)")
    adapters.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=DIR",
                          help="vLLM's form of --adapter: NAME=DIR or JSON {\"name\": NAME, \"path\": DIR}")
    adapters.add_argument("--adapter-root", default=None, metavar="DIR",
                          help="folder that runtime loading (/v1/load_lora_adapter, and a request naming a "
                               "folder in it) may read; unset: runtime loading is off")
    adapters.add_argument("--load-adapters-on-request", action=argparse.BooleanOptionalAction, default=True,
                          help="with --adapter-root, a request whose model is a folder under the root that is "
                               "not loaded yet loads it first")
    adapters.add_argument("--max-loras", type=int, default=None, metavar="N",
                          help="adapters on the device at once (default: EngineConfig's max_adapters_on_device, "
                               "64)")
    adapters.add_argument("--max-cpu-loras", type=int, default=None, metavar="N",
                          help="adapters kept in host memory, counted at the largest accepted shape; others "
                               "are read from disk again when needed (default: bounded by EngineConfig's "
                               "host_cache_bytes, 8 GiB)")
    adapters.add_argument("--pin-host-cache", action=argparse.BooleanOptionalAction, default=None,
                          help="on a GPU, pin the adapter host cache's memory at start (default: on; seconds per "
                               "few GiB once, instead of stalls while serving; off: unpinned, slower uploads)")
    adapters.add_argument("--max-lora-rank", type=int, default=64, metavar="N",
                          help="adapters of a higher rank are refused")

    net = p.add_argument_group("HTTP")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    net.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    net.add_argument("--api-key", default=None, metavar="KEY",
                     help="require `Authorization: Bearer KEY` on every route but /health and /metrics "
                          "(default: $SLORA_JAX_API_KEY; neither set: no key needed)")
    net.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                     help="server and access log verbosity")
    net.add_argument("--max-tokens-limit", type=int, default=None, metavar="N",
                     help="largest max_tokens a request may ask for (default: the context length)")
    net.add_argument("--max-body-bytes", type=int, default=4 << 20, metavar="N",
                     help="largest request body (413 beyond)")
    net.add_argument("--max-pending", type=int, default=4096, metavar="N", help="requests in flight before 429")
    net.add_argument("--max-waiting", type=int, default=100_000, metavar="N",
                     help="engine queue bound (429 beyond)")

    eng = p.add_argument_group("engine")
    eng.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                     help="devices the model is split over (heads, MLP, vocabulary)")
    eng.add_argument("--kernel-backend", default="auto", choices=["auto", "xla", "pallas"],
                     help="LoRA and attention kernels: auto = pallas on GPU, xla elsewhere")
    eng.add_argument("--num-pages", type=int, default=None, metavar="N",
                     help="pages of the unified KV + adapter pool (default: sized by --memory-fraction)")
    eng.add_argument("--memory-fraction", type=float, default=None, metavar="F",
                     help="share of the device memory free after the weights that the page pool takes, when "
                          "--num-pages is not given (default: EngineConfig's, 0.85)")
    eng.add_argument("--max-batch-size", type=int, default=64, metavar="N", help="requests decoded in one step")
    eng.add_argument("--max-prefill-tokens", type=int, default=None, metavar="N",
                     help="prompt tokens admitted in one prefill step (default: EngineConfig's, 2048)")
    eng.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=None,
                     help="compile every step program before binding (default: on GPU, where compiling a step "
                          "program on demand stalls the requests in flight for seconds)")
    dist = p.add_argument_group("several processes", "one engine over the devices of several processes (one per host "
                                "or GPU, jax.distributed): start the same command on each, with its own "
                                "--process-id; process 0 serves HTTP, the others run its steps on their devices")
    dist.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                      help="process 0's address and a free port for the coordinator it runs")
    dist.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the job")
    dist.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index, 0 to N-1")
    from slora_jax.server.flags import add_serving_limits
    add_serving_limits(p.add_argument_group("serving limits and lifecycle"))
    from slora_jax.deploy import add_replica_args
    add_replica_args(p.add_argument_group("replicas (Ray Serve; needs the ray extra)"))
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
        from slora_jax.deploy import wants_ray
        if wants_ray(args):
            if (args.num_processes or 1) > 1:  # each replica would try to join the one job
                parser.error("--replicas (separate engines on Ray Serve) and --num-processes (one engine over "
                             "several processes) cannot be combined: pick one")
            from slora_jax.deploy import run_replicas
            return run_replicas(args)
        from slora_jax.server.app import run_server
        return run_server(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
