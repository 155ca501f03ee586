"""Two engine replicas behind Ray Serve against one engine, on the same offline trace sent over HTTP (issue 17).

    python benchmarks/ray_serving.py --out ray_serving.json            # 2 x H200, llama-3-8b shape
    python benchmarks/ray_serving.py --tiny --out /tmp/ray_tiny.json   # CPU dry run, a tiny model (minutes)

Phases (each prints as it goes; --phases picks some, and a run adds its phases to an existing --out file):
  engine   one engine (GPU 0), no server: the trace through Engine.generate, the ceiling for ``direct``.
  direct   one engine (GPU 0) behind ``slora-jax serve``'s own HTTP server, in a subprocess: the offline trace
           (every request sent at once, --concurrency at a time), then --latency-requests one at a time.
  ray      ``slora-jax serve --replicas 2``'s app (slora_jax.deploy.ray) on a local Ray instance, one GPU per
           replica: the same trace, then the same one-at-a-time requests. Each request's ``x-slora-replica``
           header is counted: ``per_replica`` shows how routing spread the trace.
  ray-lean the same with Serve's user code and router on each replica's own event loop and no access log.
  ray-fast Ray's "throughput optimized" Serve (RAY_SERVE_THROUGHPUT_OPTIMIZED=1), requests sent to the ingress
           replica's own port (direct ingress), not through Serve's HTTP proxy.
Through Ray, each one-at-a-time answer carries Server-Timing ("replica", "ingress"): ``parts_p50_ms`` splits
the latency into the engine replica, the ingress around it, and the proxy with the client.
Targets read from the JSON: ``ratios.ray.throughput`` (two replicas over one engine, requests/s) >= 1.8, and
``ratios.ray.added_latency_p50_ms`` (p50 of the one-at-a-time requests through Ray minus direct) <= 2.

Both use random bf16 weights of the --model shape made on the device, and --num-adapters random PEFT adapters
(q/k/v/o, rank --rank) written to a temporary folder; every request carries ``ignore_eos`` so its output
length is the trace's. Step programs are compiled by a warm-up pass of the trace (JAX's persistent cache in
--compile-cache is shared by the phases and by later calls).

On the GPU machine (Python 3.12, no network), Ray Serve and its web stack come from a carry bundle of wheels
made on the CPU machine in /work/main/.raywhl (carry ".raywhl"; see .raywhl/MANIFEST). The command line:

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .raywhl/*.whl && export PYTHONPATH=/tmp/site:.:benchmarks && python3 benchmarks/ray_serving.py --out $OUT/ray_serving.json --compile-cache /tmp/jaxcache 2>&1 | tail -60

(kind nvidia-h200-x2, carry [".raywhl"], 45 MiB. If one call's 10 minutes do not hold both phases, split them:
``--phases direct --out /tmp/rs.json`` then ``--phases ray --out /tmp/rs.json`` (the file and the compile
cache in /tmp stay on a warm machine; copy /tmp/rs.json to $OUT at the end).

Measured on a 2-core CPU with --tiny (Python 3.12, the bundle alone): the script runs end to end in a minute.
There the one-at-a-time p50 was 9 ms direct and 22-32 ms through Ray. Timed inside: the replica's own answer
took 12.5 ms (the same engine, sharing two cores with Ray's processes), the ingress-to-replica call 1 ms more
(routing, hold and metrics 0.1 ms); the rest is Serve's proxy and ingress, whose floor for an echo app was
7.5 ms on that machine (11.5 ms with the extra handle call).)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]


PHASE_NAMES = ("engine", "direct", "ray", "ray-lean", "ray-fast")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results (phases already in it are kept)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: the tiny model, float32, a short trace")
    p.add_argument("--model", default="llama-3-8b", help="named shape with random weights")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--phases", default="direct,ray")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--num-adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=1.0, help="adapter popularity ~ rank^-alpha (Zipf)")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-range", type=int, nargs=2, default=[8, 512])
    p.add_argument("--output-range", type=int, nargs=2, default=[8, 256])
    p.add_argument("--concurrency", type=int, default=512, help="requests in flight from the client at once")
    p.add_argument("--warmup-requests", type=int, default=256, help="trace requests sent first, not counted")
    p.add_argument("--repeats", type=int, default=1, help="trace passes per phase (requests_per_s: their median)")
    p.add_argument("--latency-requests", type=int, default=100, help="one-at-a-time requests (1 token each)")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-cache", default=None, help="JAX persistent compilation cache folder")
    p.add_argument("--serve-direct", type=int, default=None, help=argparse.SUPPRESS)  # the direct subprocess
    p.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)  # the engine subprocess
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.dtype = "tiny", "float32"
        for name, value in (("num_requests", 24), ("num_adapters", 4), ("rank", 8), ("input_range", [4, 24]),
                            ("output_range", [2, 12]), ("concurrency", 16), ("warmup_requests", 8),
                            ("latency_requests", 20), ("max_batch_size", 16)):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    for flag in ("replicas", "repeats", "num_adapters", "num_requests", "concurrency", "max_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    unknown = set(args.phases.split(",")) - set(PHASE_NAMES)
    if unknown:
        p.error(f"--phases takes some of {', '.join(PHASE_NAMES)}, got {sorted(unknown)}")
    return args


# --------------------------------------------------------------------------------------------- what is served


def serve_namespace(args, adapter_dir: Path):
    """The ``slora-jax serve`` flags both phases run with (one table, so the phases differ only in Ray)."""
    from slora_jax.cli import _serve_args

    parser = argparse.ArgumentParser()
    _serve_args(parser.add_subparsers())
    argv = ["serve", "--model", args.model, "--served-model-name", "base", "--dtype", args.dtype,
            "--kernel-backend", "auto", "--max-batch-size", str(args.max_batch_size),
            "--max-loras", str(args.num_adapters), "--max-pending", str(1 << 20), "--log-level", "warning"]
    for name in adapter_names(args):
        argv += ["--adapter", f"{name}={adapter_dir / name}"]
    if args.tiny:
        argv.append("--no-precompile")  # the tiny model's few shapes compile in the warm-up pass
    ns = parser.parse_args(argv)
    ns.seed_weights = args.seed
    return ns


def adapter_names(args) -> list[str]:
    return [f"lora{i}" for i in range(args.num_adapters)]


def write_adapters(args, out: Path) -> None:
    from slora_jax.bench.setup import DEFAULT_TARGETS, resolve_model
    from slora_jax.model.random_checkpoint import write_random_adapter

    cfg, _ = resolve_model(args.model)
    dtype = "float32" if args.dtype == "float32" else "bfloat16"
    for i, name in enumerate(adapter_names(args)):
        write_random_adapter(out / name, cfg, rank=args.rank, alpha=2 * args.rank,
                             target_modules=DEFAULT_TARGETS, seed=100 + i, dtype=dtype)


def random_weights_setup():
    """ServeSetup whose engine has random weights of a named shape (no checkpoint folder to read)."""
    from slora_jax.server.app import ServeSetup, engine_config

    class RandomWeightsSetup(ServeSetup):
        def load_engine(self, adapters, progress=None):
            from slora_jax.bench.setup import ModelSource

            engine = ModelSource(self.args.model, self.args.dtype, seed=self.args.seed_weights).engine(
                engine_config(self.args))
            for name, path in adapters:
                engine.load_adapter(name, path)
            if self.args.precompile is not False:
                # Every step program before the first request, as `serve` does by default: a shape compiled
                # mid-trace stalls the engine for seconds and the throughput measures compilation.
                engine.precompile()
            return engine

    return RandomWeightsSetup


def make_trace(args) -> list[dict]:
    """The offline trace: completions bodies (token-id prompts), adapters by Zipf popularity."""
    rng = np.random.default_rng(args.seed)
    names = adapter_names(args)
    weights = 1.0 / np.arange(1, len(names) + 1) ** args.alpha
    picks = rng.choice(len(names), size=args.num_requests, p=weights / weights.sum())
    trace = []
    for i in range(args.num_requests):
        n_in = int(rng.integers(args.input_range[0], args.input_range[1] + 1))
        n_out = int(rng.integers(args.output_range[0], args.output_range[1] + 1))
        trace.append({"model": names[picks[i]], "prompt": rng.integers(3, 250, size=n_in).tolist(),
                      "max_tokens": n_out, "temperature": 0, "ignore_eos": True})
    return trace


# --------------------------------------------------------------------------------------------- client


class _Client:
    """The load generator's HTTP client: aiohttp where it is installed, else httpx.

    On a 2-core machine against a server that answers every request after 0.5 s, 512 at a time, httpx's
    AsyncClient completed 80 requests/s and aiohttp 730 (the ceiling is 1024): with httpx the client, not the
    server, set the throughput of any run near that rate."""

    def __init__(self, url: str, concurrency: int, timeout_s: float):
        self.url, self.concurrency, self.timeout_s = url, concurrency, timeout_s

    async def __aenter__(self):
        try:
            import aiohttp
        except ImportError:
            import httpx

            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            self._httpx = httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s, limits=limits)
            self._aiohttp = None
            self.name = "httpx"
        else:
            self._aiohttp = aiohttp.ClientSession(
                self.url, connector=aiohttp.TCPConnector(limit=self.concurrency),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            self.name = "aiohttp"
        return self

    async def __aexit__(self, *exc):
        await (self._aiohttp.close() if self._aiohttp is not None else self._httpx.aclose())

    async def post(self, path: str, body: dict) -> tuple[int, str, dict]:
        if self._aiohttp is not None:
            async with self._aiohttp.post(path, json=body) as r:
                return r.status, await r.text(), _joined(r.headers.items())
        r = await self._httpx.post(path, json=body)
        return r.status_code, r.text, _joined(r.headers.multi_items())


def _joined(items) -> dict:
    """Headers by lower-case name, repeated ones joined with ", " (Server-Timing comes once per hop)."""
    out: dict = {}
    for k, v in items:
        k = k.lower()
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def server_timing(value: str) -> dict:
    """``{name: ms}`` from a Server-Timing header ("replica;dur=12.3, ingress;dur=14.1")."""
    out = {}
    for entry in value.split(","):
        name, *params = [x.strip() for x in entry.split(";")]
        for param in params:
            if param.startswith("dur="):
                out[name] = float(param[4:])
    return out


async def _send(client: _Client, body, timing: Optional[list] = None) -> tuple[float, int, int, str]:
    t0 = time.perf_counter()
    status, text, headers = await client.post("/v1/completions", body)
    if status != 200:
        raise RuntimeError(f"{status}: {text[:300]}")
    seconds = time.perf_counter() - t0
    if timing is not None:
        timing.append(dict(server_timing(headers.get("server-timing", "")), total=seconds * 1e3))
    tokens = json.loads(text)["usage"]["completion_tokens"]
    return seconds, tokens, len(body["prompt"]), headers.get("x-slora-replica", "-")


async def run_trace(url: str, trace: list[dict], concurrency: int) -> dict:
    """Every request of ``trace`` at once (``concurrency`` in flight); throughput and latencies."""
    async with _Client(url, concurrency, 1800) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(body):
            async with gate:
                return await _send(client, body)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in trace))
        wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    out_tokens = sum(r[1] for r in results)
    per_replica: dict[str, dict] = {}  # how routing spread the trace: requests and tokens per replica
    for _, n_out, n_in, replica in results:
        row = per_replica.setdefault(replica, {"requests": 0, "output_tokens": 0, "prompt_tokens": 0})
        row["requests"] += 1
        row["output_tokens"] += n_out
        row["prompt_tokens"] += n_in
    return {"requests": len(trace), "seconds": wall, "requests_per_s": len(trace) / wall,
            "output_tokens_per_s": out_tokens / wall, "output_tokens": out_tokens,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p90_s": float(np.percentile(lat, 90)),
            "per_replica": per_replica, "client": client.name}


async def one_at_a_time(url: str, trace: list[dict], n: int) -> dict:
    """``n`` requests in turn, one output token each: per-request latency with an idle server."""
    async with _Client(url, 1, 600) as client:
        timing: list[dict] = []
        for i in range(n + 5):
            body = dict(trace[i % len(trace)], max_tokens=1, prompt=trace[i % len(trace)]["prompt"][:16])
            await _send(client, body, timing)
    timing = timing[5:]  # the first few compile the one-token shapes
    lat = np.array([t["total"] for t in timing])
    out = {"requests": n, "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
           "mean_ms": float(lat.mean())}
    # Through Ray, where the time went (p50 of each part): the engine replica, the ingress around it, and the
    # rest (Serve's HTTP proxy, the network, the client).
    if timing and all("ingress" in t and "replica" in t for t in timing):
        parts = {"replica": [t["replica"] for t in timing],
                 "ingress_without_replica": [t["ingress"] - t["replica"] for t in timing],
                 "proxy_and_client": [t["total"] - t["ingress"] for t in timing]}
        out["parts_p50_ms"] = {k: float(np.percentile(v, 50)) for k, v in parts.items()}
    return out


def summarize(runs: list[dict]) -> dict:
    """Passes of one trace: rates and seconds as their median, each pass's rates beside them and each whole
    record (latencies, per_replica) in "repeats"."""
    out = {k: float(np.median([r[k] for r in runs])) for k in ("requests_per_s", "output_tokens_per_s", "seconds")}
    out.update(requests=runs[-1]["requests"], output_tokens=runs[-1]["output_tokens"], repeats=runs,
               repeats_requests_per_s=[r["requests_per_s"] for r in runs],
               repeats_output_tokens_per_s=[r["output_tokens_per_s"] for r in runs])
    return out


def measure(url: str, args, trace: list[dict]) -> dict:
    t0 = time.perf_counter()
    asyncio.run(run_trace(url, trace[:args.warmup_requests], args.concurrency))
    warm = time.perf_counter() - t0
    runs = [asyncio.run(run_trace(url, trace, args.concurrency)) for _ in range(args.repeats)]
    result = summarize(runs)
    result.update(client=runs[-1]["client"], per_replica=runs[-1]["per_replica"], warmup_s=warm)
    result["one_at_a_time"] = asyncio.run(one_at_a_time(url, trace, args.latency_requests))
    return result


# --------------------------------------------------------------------------------------------- phases


def wait_healthy(url: str, proc=None, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s:g} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_direct(args, adapter_dir: Path) -> int:
    """The direct phase's server (a subprocess): one engine behind ``slora-jax serve``'s HTTP server."""
    from slora_jax.server.lifecycle import serve
    from slora_jax.server.startup import bind

    setup = random_weights_setup()(serve_namespace(args, adapter_dir))
    lifecycle = setup.lifecycle()
    sock = bind("127.0.0.1", args.serve_direct)
    sock.listen(4096)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return serve(lambda: setup.create_app(setup.load_engine(setup.adapters), lifecycle), sock, lifecycle,
                 drain_s=5, header_timeout_s=None, max_connections=None, keep_alive_s=60, log_level="warning")


def run_engine(args, adapter_dir: Path) -> int:
    """The engine phase's subprocess: the trace through ``Engine.generate`` in-process, no HTTP; one JSON line."""
    from slora_jax.types import SamplingParams

    trace = make_trace(args)
    setup = random_weights_setup()(serve_namespace(args, adapter_dir))
    engine = setup.load_engine(setup.adapters)

    def run(bodies) -> dict:
        t0 = time.perf_counter()
        outs = engine.generate([b["prompt"] for b in bodies], adapters=[b["model"] for b in bodies],
                               sampling=[SamplingParams(max_tokens=b["max_tokens"], ignore_eos=True) for b in bodies])
        wall, tokens = time.perf_counter() - t0, sum(len(o.token_ids) for o in outs)
        return {"requests": len(bodies), "seconds": wall, "requests_per_s": len(bodies) / wall,
                "output_tokens_per_s": tokens / wall, "output_tokens": tokens}

    warm = run(trace[:args.warmup_requests])["seconds"]
    print("ENGINE " + json.dumps(dict(summarize([run(trace) for _ in range(args.repeats)]), warmup_s=warm)),
          flush=True)
    engine.close()
    return 0


def _one_engine_child(args, adapter_dir: Path, *flags: str) -> tuple[list[str], dict]:
    """argv and environment of a subprocess of this script that runs one engine on GPU 0, as a replica has."""
    env = dict(os.environ)
    if not args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    return [sys.executable, __file__, *sys.argv[1:], *flags, "--adapter-dir", str(adapter_dir)], env


def phase_engine(args, adapter_dir: Path, trace: list[dict]) -> dict:
    """One engine (GPU 0) with no server: what the trace costs the engine alone, the ceiling for ``direct``."""
    argv, env = _one_engine_child(args, adapter_dir, "--engine-only")
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ENGINE ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"engine phase failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(line[len("ENGINE "):])


def phase_direct(args, adapter_dir: Path, trace: list[dict]) -> dict:
    port = free_port()
    argv, env = _one_engine_child(args, adapter_dir, "--serve-direct", str(port))
    proc = subprocess.Popen(argv, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        wait_healthy(url, proc)
        result = {"startup_s": time.perf_counter() - t0, **measure(url, args, trace)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return result


# Ray Serve settings that take hops off each request: user code and the router on the replica's own event
# loop (not a second thread's), and no per-request access log lines (each is written and shipped to the driver).
LEAN_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# Ray's "throughput optimized" Serve: the lean settings, gRPC between replicas, and direct ingress: the ingress
# replica serves HTTP on a port of its own (from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT up), so requests skip
# Serve's HTTP proxy. On the 2-core CPU an echo app of two deployments answered in 11.4 ms (p50) through the
# proxy and 2.4 ms on the ingress's own port.
FAST_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def phase_ray_lean(args, adapter_dir: Path, trace: list[dict]) -> dict:
    return phase_ray(args, adapter_dir, trace, variant="lean")


def phase_ray_fast(args, adapter_dir: Path, trace: list[dict]) -> dict:
    return phase_ray(args, adapter_dir, trace, variant="fast")


def phase_ray(args, adapter_dir: Path, trace: list[dict], variant: str = "default") -> dict:
    import functools

    import ray
    from ray import serve

    from slora_jax.deploy.ray import APP_NAME, ReplicaOptions, build_app

    if _hung:
        raise RuntimeError(f"skipped: {_hung[0]} of an earlier phase did not return")

    # Ray's workers start in a folder of their own: the import path they need, made absolute.
    path = os.pathsep.join(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    env = {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (path, str(REPO), str(REPO / "benchmarks")) if x)
    port, ingress_port = free_port(), free_port()
    extra = {"default": {}, "lean": LEAN_ENV,
             "fast": dict(FAST_ENV, RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(ingress_port),
                          RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(min(ingress_port + 100, 65535)))}[variant]
    saved = {k: os.environ.get(k) for k in extra}
    try:
        # Read when Serve's processes start: the raylet's children inherit the driver's environment.
        os.environ.update(extra)
        env.update(extra)
        lean = variant != "default"
        ray.init(include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=not lean)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        ns = serve_namespace(args, adapter_dir)
        options = ReplicaOptions(replicas=args.replicas, num_gpus=0 if args.tiny else 1,
                                 num_cpus=0.5 if args.tiny else 4, max_ongoing_requests=4 * args.max_batch_size,
                                 max_adapters_per_replica=args.num_adapters)
        t0 = time.perf_counter()
        serve.run(build_app(functools.partial(random_weights_setup(), ns), options), name=APP_NAME,
                  route_prefix="/", logging_config={"enable_access_log": False} if lean else None)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        if variant == "fast":  # the ingress replica's own port: the first free one from ingress_port
            url = _direct_ingress_url(ingress_port, skip=port)
        result = {"url": url, "startup_s": time.perf_counter() - t0, **measure(url, args, trace)}
        import httpx

        result["replicas"] = {card["id"]: card.get("replicas") for card in
                              httpx.get(url + "/v1/models", timeout=60).json()["data"]}
        result["served_by"] = _served_by(url, trace)
        # Printed before shutting down: on the GPU host Serve's shutdown has hung past the call's time limit
        # (the controller not answering), and a result held until after it was lost with the process.
        print("PHASE_RESULT " + json.dumps(result), flush=True)
        return result
    finally:
        _bounded("serve.shutdown", serve.shutdown, 60)
        _bounded("ray.shutdown", ray.shutdown, 60)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_hung: list = []  # shutdowns that did not return: a late one could tear down the next phase's Ray session


def _bounded(what: str, fn, timeout_s: float) -> None:
    """Run ``fn`` for at most ``timeout_s``: a hung shutdown is reported and left behind (a daemon thread), so
    the results measured before it are still written and the next phase still runs."""
    import threading

    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        print(f"warning: {what} did not return within {timeout_s:.0f} s; later Ray phases are skipped", flush=True)
        _hung.append(what)


def _direct_ingress_url(first_port: int, skip: int) -> str:
    """Where the ingress replica serves HTTP itself: the first port from ``first_port`` that answers, other
    than ``skip`` (Serve's proxy, which answers too but is the hop this phase leaves out)."""
    import httpx

    for p in range(first_port, min(first_port + 100, 65536)):
        if p == skip:
            continue
        try:
            if httpx.get(f"http://127.0.0.1:{p}/health", timeout=5).status_code == 200:
                return f"http://127.0.0.1:{p}"
        except httpx.TransportError:
            continue
    raise RuntimeError(f"no direct-ingress port answered from {first_port}")


def _served_by(url: str, trace: list[dict]) -> dict:
    """Which replica answers each adapter now (one 1-token request per adapter): where routing sent them."""
    import httpx

    seen = {}
    for body in trace:
        if body["model"] not in seen:
            r = httpx.post(url + "/v1/completions", json=dict(body, max_tokens=1), timeout=120)
            seen[body["model"]] = r.headers.get("x-slora-replica")
    return seen


def device_name(tiny: bool) -> str:
    if tiny:
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        return f"{len(out)} x {out[0]}" if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


PHASES = dict(zip(PHASE_NAMES, (phase_engine, phase_direct, phase_ray, phase_ray_lean, phase_ray_fast)))


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    adapter_dir = None
    if "--adapter-dir" in raw:  # the direct phase's subprocess is handed the parent's adapters
        i = raw.index("--adapter-dir")
        adapter_dir = Path(raw[i + 1])
        raw = raw[:i] + raw[i + 2:]
    args = parse_args(raw)
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.compile_cache:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(args.compile_cache).resolve()))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    if args.serve_direct is not None:
        return serve_direct(args, adapter_dir)
    if args.engine_only:
        return run_engine(args, adapter_dir)

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    import jax

    results.update({"device": device_name(args.tiny), "jax_version": jax.__version__,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "config": {k: v for k, v in vars(args).items() if k not in ("out", "serve_direct")}})
    try:
        import ray
        results["ray_version"] = ray.__version__
    except ImportError:
        pass
    trace = make_trace(args)
    with tempfile.TemporaryDirectory(prefix="ray_serving_") as tmp:
        adapters = Path(tmp) / "adapters"
        write_adapters(args, adapters)
        for phase in args.phases.split(","):
            print(f"== {phase}", flush=True)
            t0 = time.perf_counter()
            try:
                results[phase] = PHASES[phase](args, adapters, trace)
            except Exception as e:  # one failed phase keeps the others' numbers
                traceback.print_exc()
                results[phase] = {"error": f"{type(e).__name__}: {e}"}
            results[phase]["phase_s"] = time.perf_counter() - t0
            print(json.dumps(results[phase], indent=1), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    results["ratios"] = {}
    for name in ("ray", "ray-lean", "ray-fast"):
        if all(k in results and "error" not in results[k] for k in ("direct", name)):
            d, r = results["direct"], results[name]
            results["ratios"][name] = {
                "throughput": r["requests_per_s"] / d["requests_per_s"],
                "added_latency_p50_ms": r["one_at_a_time"]["p50_ms"] - d["one_at_a_time"]["p50_ms"],
                "targets": {"throughput_at_least": 1.8, "added_latency_p50_ms_at_most": 2.0}}
    if all(k in results and "error" not in results[k] for k in ("engine", "direct")):
        results["ratios"]["direct_over_engine"] = (results["direct"]["requests_per_s"]
                                                   / results["engine"]["requests_per_s"])
    print("ratios:", json.dumps(results["ratios"]), flush=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
