"""What one call from Serve's ingress replica to an engine replica costs, with no engine (issue 17's latency).

    python benchmarks/ray_hop.py --out ray_hop.json

Each request through ``slora-jax serve --replicas`` crosses one Serve handle call, from the ingress replica to an
engine replica (slora_jax.deploy.ray). This times that hop alone, on echo replicas that sleep ``--sleep-ms``
(standing in for the engine), from inside the ingress replica, per request: to the replica (send to the method's
start), back (its return to the caller's wake-up), and what the call adds over the sleep in all. Beside it, the
same through a plain Ray actor call (no Serve), the floor of any design that crosses processes through Ray.
Each Serve mode runs in a fresh process (Serve reads its mode when its processes start): ``default`` and
``fast`` (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: gRPC between replicas, user code on the replica's own loop), each with
and without a multiplexed model id on the call. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

MODES = {"default": {}, "fast": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}


def _summary(rows) -> dict:
    a = np.asarray(rows) * 1e3
    return {k: float(np.median(a[:, i])) for i, k in enumerate(("to_ms", "back_ms", "added_ms"))} | {
        "added_p90_ms": float(np.percentile(a[:, 2], 90)), "n": len(rows)}


async def _timed_calls(call, count: int) -> list[tuple[float, float, float]]:
    """``count`` calls of ``call(t_send)`` (an awaitable of the callee's (t_in, t_out)), one at a time: per call,
    (to the callee, back from it, what the call added over the callee's own time), in seconds."""
    rows = []
    for _ in range(count):
        t0 = time.time()
        t_in, t_out = await call(t0)
        t1 = time.time()
        rows.append((t_in - t0, t1 - t_out, t1 - t0 - (t_out - t_in)))
    return rows


async def _sleep_timed(sleep_s: float) -> tuple[float, float]:
    """The echo's answer: when it started, and when it ended after sleeping ``sleep_s``."""
    t_in = time.time()
    await asyncio.sleep(sleep_s)
    return t_in, time.time()


def child(n: int, sleep_s: float) -> dict:
    import ray
    from ray import serve

    @serve.deployment(max_ongoing_requests=256)
    class Echo:
        async def answer(self, t_send):
            return await _sleep_timed(sleep_s)

    @serve.deployment(max_ongoing_requests=1000)
    class Ingress:
        def __init__(self, echo):
            self.echo = echo

        async def probe(self, model_id: str, count: int):
            # options() per call, as the slora-jax ingress makes it per request
            return await _timed_calls(
                lambda t0: self.echo.options(multiplexed_model_id=model_id).answer.remote(t0), count)

    @ray.remote
    class Plain:
        async def answer(self, t_send):
            return await _sleep_timed(sleep_s)

    @ray.remote
    class Caller:
        def __init__(self, target):
            self.target = target

        async def probe(self, count: int):
            return await _timed_calls(lambda t0: self.target.answer.remote(t0), count)

    ray.init(include_dashboard=False)
    try:
        handle = serve.run(Ingress.bind(Echo.bind()), name="hop", route_prefix=None)
        out = {}

        async def probes():  # in "fast" mode a handle routes only from inside an event loop
            for label, model in (("serve", ""), ("serve_multiplexed", "adapter-1")):
                await handle.probe.remote(model, 20)  # warm-up
                out[label] = _summary(await handle.probe.remote(model, n))

        asyncio.run(probes())
        caller = Caller.remote(Plain.remote())
        ray.get(caller.probe.remote(20))
        out["plain_actor"] = _summary(ray.get(caller.probe.remote(n)))
        return out
    finally:
        try:
            serve.shutdown()
        except RuntimeError:  # "fast" mode: the handle's router lived on the loop asyncio.run closed
            pass
        ray.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--modes", default="default,fast")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--sleep-ms", type=float, default=10.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.requests, args.sleep_ms / 1e3)), flush=True)
        return 0
    import ray

    results = {}
    for mode in args.modes.split(","):
        env = dict(os.environ, **MODES[mode])
        cmd = [sys.executable, __file__, "--child", "--out", "-", "--requests", str(args.requests),
               "--sleep-ms", str(args.sleep_ms)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as e:  # the other modes still run and are written
            results[mode] = {"error": f"no answer in {e.timeout:g} s"}
            print(f"[{mode}] failed: {results[mode]['error']}", flush=True)
            continue
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            results[mode] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            print(f"[{mode}] failed: {results[mode]['error'][-400:]}", flush=True)
            continue
        results[mode] = json.loads(line[len("RESULT "):])
        print(f"[{mode}] {results[mode]}", flush=True)
    record = dict(device=f"{platform.node()} ({os.cpu_count()} CPUs)",
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join(["python", "benchmarks/ray_hop.py"] + (argv or sys.argv[1:])),
                  ray_version=ray.__version__, cpus=os.cpu_count(), sleep_ms=args.sleep_ms, results=results)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"{'mode':<9}{'call':<19}{'to ms':>8}{'back ms':>9}{'added p50':>11}{'p90':>7}")
    for mode, res in results.items():
        for label, r in res.items():
            if isinstance(r, dict) and "to_ms" in r:
                print(f"{mode:<9}{label:<19}{r['to_ms']:>8.2f}{r['back_ms']:>9.2f}{r['added_ms']:>11.2f}"
                      f"{r['added_p90_ms']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
