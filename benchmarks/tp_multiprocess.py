"""Tensor parallelism driven by one process per device against one process driving every device.

At TP=2 on 2 x H200 with one process, the host launch of a step took 4.7-7 ms against 1.5 ms at TP=1
(benchmarks/NOTES.md, "Tensor parallelism with the Pallas kernels"). Here the same offline workload runs,
one variant after another, each in fresh processes so that device memory is freed between them:

- ``tp1``: TP=1, one process, one device;
- ``sp``:  TP=N, one process driving N devices (as offline.py --tensor-parallel N);
- ``mp``:  TP=N, N processes on this host, process i seeing only device i, joined by ``jax.distributed``
  with a coordinator on localhost (multi-controller JAX, as vLLM drives TP). Process 0 runs
  ``Engine.generate``; the others run ``Engine.follow()`` and make process 0's steps.

Every variant makes the same random weights (a named shape, e.g. llama-3-8b, seed 0), the same synthetic
adapters (``--adapters``: registered from memory on every process, as offline.py does), the same page
count (``--pool-gb``, so that no variant's pool is sized by what another left), precompiles every step
program, runs a short check generate (the warm-up; its greedy tokens are compared across variants), then
times ``--repeats`` x cases of ``--num-requests`` requests with ``slora_jax.bench.offline.run_case``:
output tok/s, the floor, host share, and per step ``stats()["dispatch_breakdown_s"]`` (``launch``: host
time queuing the step program). Process 0 writes the JSON (device, jax version, date, command, numbers;
the other processes' own launch times are in it too), updated after every variant.

GPU, 2 x H200 (nvidia-h200-x2), one call of under ~9 minutes (each 8B variant builds and precompiles in
~1-2 min):

    python3 benchmarks/tp_multiprocess.py --platform gpu --tp 2 --variants mp,sp,tp1 --num-requests 512 \\
        --input-len 256 --output-len 256 --adapters 0,100 --repeats 2 --deadline-s 540 \\
        --out $OUT/tp_multiprocess.json

(the variants run in that order, so a cut-short call loses TP=1, which earlier calls measured; each
variant writes after every case, and one stuck for --variant-timeout-s, 300 s, is killed.)

CPU dry run (tiny float32 model, 2 simulated devices for ``sp``, 2 CPU processes for ``mp``): the check
tokens of every variant must equal TP=1's (asserted in float32):

    JAX_PLATFORMS=cpu python benchmarks/tp_multiprocess.py --platform cpu --model tiny --dtype float32 \\
        --num-requests 8 --input-len 12 --output-len 8 --adapters 0,3 --repeats 1 --max-batch-size 8 \\
        --pool-gb 0.02 --weight-std 0.08 --check-requests 8 --check-tokens 8 --out /tmp/tp_mp.json

``--isolate jax``: the ``mp`` processes see every GPU and JAX keeps to its own (JAX_LOCAL_DEVICE_IDS)
instead of CUDA_VISIBLE_DEVICES=i; ``--isolate auto`` (default) tries that if the first way fails.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- worker
def worker(args) -> int:
    """One process of one variant. ``mp``: joins the job before anything touches a device."""
    pid, n = args.process_id, args.tp
    multi = args.variant == "mp" and n > 1
    if multi:
        from sharding import initialize
        initialize(f"127.0.0.1:{args.port}", n, pid)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import slora_jax as sj
    from sharding import TensorParallelLayout, make_mesh
    from slora_jax.bench.floors import copy_bandwidth, matmul_rate
    from slora_jax.bench.offline import run_case
    from slora_jax.bench.setup import SyntheticAdapters, resolve_model
    from slora_jax.memory.pool import PoolLayout
    from slora_jax.model.init import random_params

    tp = 1 if args.variant == "tp1" else n
    tag = f"[{args.variant} tp={tp} p{pid}]"

    def say(msg):
        print(f"{tag} {msg}", flush=True)

    want_devices = (n if multi else tp, 1 if multi else tp)
    got = (len(jax.devices()), len(jax.local_devices()))
    assert got == want_devices, f"{tag} devices (global, local) {got}, expected {want_devices}"
    tiny = args.model == "tiny"
    cfg = resolve_model(args.model)[0]
    dt = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    itemsize = jnp.dtype(dt).itemsize
    bw = mm = None
    if pid == 0:  # this process's device alone: the floor's bandwidth and matmul rate
        bw = copy_bandwidth(64 << 20 if tiny else 2 << 30)
        mm = matmul_rate(512 if tiny else 8192)
    # Pages from bytes, the same in every variant (engines would size their pool from the memory left,
    # which the random weights made before the engine still take).
    unit = PoolLayout(cfg.num_layers, 1, 16, TensorParallelLayout(cfg, tp).pool_width, shards=tp)
    pages = args.num_pages or max(64, int(args.pool_gb * 2**30 // unit.bytes_per_page(itemsize)))
    dist = dict(distributed_coordinator=f"127.0.0.1:{args.port}", num_processes=n, process_id=pid) if multi else {}
    counts = [int(x) for x in args.adapters.split(",")]
    econf = sj.EngineConfig(dtype=args.dtype, kernel_backend=args.kernel_backend, max_batch_size=args.max_batch_size,
                            tensor_parallel=tp, max_model_len=args.input_len + args.output_len + 16, num_pages=pages,
                            max_prefill_tokens=args.max_prefill_tokens, page_rows=16,
                            max_adapters_on_device=min(max(counts + [1]), 1024), host_cache_bytes=200 << 30,
                            compile_cache_dir=args.compile_cache_dir, **dist)
    t0 = time.perf_counter()
    where = None if tp == 1 else NamedSharding(make_mesh(tp), PartitionSpec())
    params = random_params(cfg, dt, seed=0, std=args.weight_std, device=where)
    engine = sj.Engine(cfg, params, econf)
    del params
    gc.collect()
    synth = SyntheticAdapters(cfg, (8, 16, 32, 64), weight_sets=2)
    names = synth.register(engine, max(counts)) if max(counts) else []
    adapter_bytes = {nm: synth.nbytes(i, itemsize) for i, nm in enumerate(names)}
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = engine.precompile(sampling=False)
    precompile_s = time.perf_counter() - t0
    say(f"engine built in {build_s:.0f} s ({pages} pages, backend {engine.kernel_backend}), "
        f"{len(compiled)} programs compiled in {precompile_s:.0f} s")
    record = dict(variant=args.variant, tensor_parallel=tp, processes=n if multi else 1, process_id=pid,
                  device=str(jax.local_devices()[0].device_kind), devices=got, jax_version=jax.__version__,
                  kernel_backend=engine.kernel_backend, num_pages=pages, build_s=build_s, precompile_s=precompile_s,
                  programs_compiled=len(compiled),
                  env={k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS", "XLA_FLAGS",
                                                      "JAX_PLATFORMS")})
    if pid != 0:
        s0 = engine.stats()
        engine.follow()
        s1 = engine.stats()
        steps = s1["steps"] - s0["steps"]
        record.update(followed_steps=steps, dispatch_s={k: s1["dispatch_breakdown_s"][k] - s0["dispatch_breakdown_s"][k]
                                                        for k in s1["dispatch_breakdown_s"]})
        record["launch_ms_per_step"] = 1e3 * record["dispatch_s"]["launch"] / max(1, steps)
        engine.close()
        _write(args.result, record)
        say(f"followed {steps} steps, launch {record['launch_ms_per_step']:.2f} ms/step")
        return 0

    rng = np.random.default_rng(0)
    V = cfg.vocab_size
    prompts = [rng.integers(3, V - 1, args.input_len).tolist() for _ in range(args.num_requests)]
    picks_of = {c: [int(i) for i in rng.integers(0, c, args.num_requests)] for c in counts if c}
    sp = sj.SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    # The check (and warm-up): the first requests, every other one on an adapter when there are any.
    k = min(args.check_requests, len(prompts))
    check_adapters = [None if (i % 2 == 0 or not names) else names[i % len(names)] for i in range(k)]
    outs = engine.generate(prompts[:k], adapters=check_adapters,
                           sampling=sj.SamplingParams(max_tokens=min(args.output_len, args.check_tokens),
                                                      ignore_eos=True))
    record["check"] = dict(adapters=check_adapters, tokens=[o.token_ids for o in outs])
    results = []
    for rep in range(args.repeats):
        for c in counts:
            picks = None if c == 0 else [names[i] for i in picks_of[c]]
            res = run_case(engine, prompts, picks, sp, cfg, itemsize, adapter_bytes, tp * bw["bytes_per_s"], tp * mm)
            c_ = res["counters"]
            res.update(case="base" if c == 0 else f"{c} adapters", adapters=c, repeat=rep,
                       step_ms=1e3 * res["wall_s"] / max(1, c_["steps"]),
                       launch_ms_per_step=1e3 * res["host_parts_s"]["dispatch.launch"] / max(1, c_["steps"]),
                       dispatch_ms_per_step=1e3 * res["host_parts_s"]["dispatch"] / max(1, c_["steps"]))
            res.pop("host_profile", None)
            results.append(res)
            say(f"{res['case']} #{rep}: {res['output_tok_s']:.0f} out tok/s, {c_['steps']} steps of "
                f"{res['step_ms']:.2f} ms, launch {res['launch_ms_per_step']:.2f} ms/step, host share "
                f"{res['host_overhead_share']:.3f}, {res['pct_of_floor']:.0f}% of floor")
            record.update(results=results, copy_bandwidth=bw, matmul_flops_per_s=mm)
            _write(args.result, dict(record, partial=True))
    engine.stop_followers()
    engine.close()
    _write(args.result, record)
    return 0


def _write(path, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _envs(variant: str, n: int, platform: str, isolate: str) -> list[dict]:
    """The environment of each process of ``variant``."""
    base = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if platform == "cpu":  # each process's own device count, whatever the caller's XLA_FLAGS said
        base.pop("XLA_FLAGS", None)
        base["JAX_PLATFORMS"] = "cpu"
        count = {"tp1": 1, "sp": n, "mp": 1}[variant]
        return [dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
                for _ in range(n if variant == "mp" else 1)]
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(n)))).split(",") if g][:n]
    assert len(gpus) == n, f"{n} GPUs wanted, CUDA_VISIBLE_DEVICES lists {gpus}"
    if variant == "tp1":
        return [dict(base, CUDA_VISIBLE_DEVICES=gpus[0])]
    if variant == "sp":
        return [dict(base, CUDA_VISIBLE_DEVICES=",".join(gpus))]
    if isolate == "cuda":  # process i sees GPU i alone
        return [dict(base, CUDA_VISIBLE_DEVICES=g) for g in gpus]
    # every GPU visible (NCCL sees them all), JAX keeps to its own
    return [dict(base, CUDA_VISIBLE_DEVICES=",".join(gpus), JAX_LOCAL_DEVICE_IDS=str(i)) for i in range(n)]


def run_variant(args, variant: str, isolate: str, budget_s: float, workdir: Path) -> dict:
    n = args.tp
    envs = _envs(variant, n, args.platform, isolate)
    port = _free_port()
    results = [workdir / f"{variant}-{isolate}-p{i}.json" for i in range(len(envs))]
    for r in results:
        r.unlink(missing_ok=True)
    passthrough = ["--model", args.model, "--dtype", args.dtype, "--kernel-backend", args.kernel_backend,
                   "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
                   "--output-len", str(args.output_len), "--adapters", args.adapters, "--repeats", str(args.repeats),
                   "--max-batch-size", str(args.max_batch_size), "--max-prefill-tokens", str(args.max_prefill_tokens),
                   "--pool-gb", str(args.pool_gb), "--num-pages", str(args.num_pages or 0),
                   "--check-requests", str(args.check_requests), "--check-tokens", str(args.check_tokens),
                   "--weight-std", str(args.weight_std), "--tp", str(n), "--platform", args.platform]
    if args.compile_cache_dir:
        passthrough += ["--compile-cache-dir", args.compile_cache_dir]
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--variant", variant, "--process-id", str(i),
                               "--port", str(port), "--result", str(results[i])] + passthrough, env=env)
             for i, env in enumerate(envs)]
    status = "ok"
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() - t0 > budget_s:
                status = "timed out"
                break
            if any(p.poll() not in (None, 0) for p in procs):  # one failed: the others would wait for it
                time.sleep(5)  # let its siblings report their own error first
                status = "failed"
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if status == "ok" and any(codes):
        status = "failed"
    out = dict(variant=variant, isolate=isolate if variant == "mp" else None, status=status, returncodes=codes,
               wall_s=time.monotonic() - t0)
    recs = []
    for r in results:
        try:
            recs.append(json.loads(r.read_text()))
        except (OSError, ValueError):
            recs.append(None)
    out["process0"] = recs[0]
    out["others"] = recs[1:]
    return out


def _summarize(runs: list, fp32: bool) -> dict:
    """Ratios between variants per (case, repeat), and the check tokens against TP=1's."""
    tok = {}
    for run in runs:
        for r in ((run.get("process0") or {}).get("results") or []):
            tok[(run["variant"], r["case"], r["repeat"])] = r["output_tok_s"]
    ratios = []
    for (v, case, rep), x in sorted(tok.items()):
        if v == "tp1":
            continue
        row = dict(variant=v, case=case, repeat=rep, out_tok_s=x)
        if ("tp1", case, rep) in tok:
            row["vs_tp1"] = x / tok[("tp1", case, rep)]
        if v == "mp" and ("sp", case, rep) in tok:
            row["vs_sp"] = x / tok[("sp", case, rep)]
        ratios.append(row)
    checks = {run["variant"]: (run.get("process0") or {}).get("check") for run in runs if run["status"] == "ok"}
    ref = checks.get("tp1")
    check = dict(reference="tp1", compared={})
    for v, c in checks.items():
        if v == "tp1" or c is None or ref is None:
            continue
        same = [a == b for a, b in zip(ref["tokens"], c["tokens"])]
        agree = [sum(x == y for x, y in zip(a, b)) / max(1, len(a)) for a, b in zip(ref["tokens"], c["tokens"])]
        check["compared"][v] = dict(requests=len(same), identical=sum(same), token_agreement=sum(agree) / len(agree))
    check["all_identical"] = bool(check["compared"]) and all(
        c["identical"] == c["requests"] for c in check["compared"].values())
    check["asserted"] = fp32
    return dict(ratios=ratios, token_check=check)


def launcher(args) -> int:
    import jax  # the version only: nothing here touches a device (the workers own them)

    variants = [v for v in args.variants.split(",") if v]
    assert all(v in ("tp1", "sp", "mp") for v in variants), f"unknown variant in {variants}"
    workdir = Path(args.workdir or (Path(args.out).parent if args.out else Path("/tmp")))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    record = dict(jax_version=jax.__version__, platform=args.platform,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command="python " + " ".join(sys.argv), tp=args.tp, model=args.model, dtype=args.dtype,
                  workload=dict(num_requests=args.num_requests, input_len=args.input_len, output_len=args.output_len,
                                adapters=args.adapters, repeats=args.repeats, max_batch_size=args.max_batch_size),
                  runs=[])
    for v in variants:
        if v == "sp" and args.tp == 1:
            continue
        tries = ["cuda", "jax"] if (v == "mp" and args.isolate == "auto" and args.platform == "gpu") else \
            [args.isolate if args.isolate != "auto" else "cuda"]
        for isolate in tries:
            left = args.deadline_s - (time.monotonic() - t_start)
            if left < 30:
                record["runs"].append(dict(variant=v, status="skipped: no time left"))
                break
            print(f"=== {v} (TP={1 if v == 'tp1' else args.tp}"
                  f"{', isolate ' + isolate if v == 'mp' else ''}), {left:.0f} s left", flush=True)
            run = run_variant(args, v, isolate, min(left, args.variant_timeout_s), workdir)
            record["runs"].append(run)
            print(f"=== {v}: {run['status']} in {run['wall_s']:.0f} s", flush=True)
            record.update(_summarize(record["runs"], args.dtype == "float32"))
            if args.out:
                _write(args.out, record)
            # A run that timed out after it measured something is kept; one stuck before (e.g. in the first
            # collective) is tried the other way too.
            if run["status"] == "ok" or (run["status"] == "timed out" and (run.get("process0") or {}).get("results")):
                break
    first = next((r["process0"] for r in record["runs"] if r.get("process0")), None)
    record["device"] = first["device"] if first else None
    record.update(_summarize(record["runs"], args.dtype == "float32"))
    if args.out:
        _write(args.out, record)
    print(f"\n{record['device']}, jax {record['jax_version']}, {args.model} {args.dtype}, "
          f"{args.num_requests} requests of {args.input_len}/{args.output_len}")
    print(f"{'variant':<8}{'proc':>5}{'case':>14}{'rep':>4}{'out tok/s':>11}{'step ms':>9}{'launch ms':>10}"
          f"{'launch p1':>10}{'host':>7}{'% floor':>8}{'vs tp1':>8}{'vs sp':>7}")
    ratio = {(r["variant"], r["case"], r["repeat"]): r for r in record["ratios"]}
    for run in record["runs"]:
        p0 = run.get("process0") or {}
        others = [o for o in (run.get("others") or []) if o]
        p1 = f"{others[0]['launch_ms_per_step']:.2f}" if others else "-"
        if not p0.get("results"):
            print(f"{run['variant']:<8} {run['status']}")
        for r in p0.get("results") or []:
            q = ratio.get((run["variant"], r["case"], r["repeat"]), {})
            print(f"{run['variant']:<8}{p0['processes']:>5}{r['case']:>14}{r['repeat']:>4}{r['output_tok_s']:>11.0f}"
                  f"{r['step_ms']:>9.2f}{r['launch_ms_per_step']:>10.2f}{p1:>10}{r['host_overhead_share']:>7.3f}"
                  f"{r['pct_of_floor']:>8.0f}{q.get('vs_tp1', float('nan')):>8.3f}{q.get('vs_sp', float('nan')):>7.3f}")
    chk = record["token_check"]
    for v, c in chk["compared"].items():
        print(f"check tokens, {v} vs tp1: {c['identical']}/{c['requests']} requests identical, "
              f"token agreement {c['token_agreement']:.3f}")
    ok = all(r["status"] == "ok" for r in record["runs"])
    if args.dtype == "float32":
        verdict = "PASS" if chk["all_identical"] else "FAIL"
        print(f"token check (float32, every TP=N variant's greedy tokens == TP=1's): {verdict}")
        ok = ok and chk["all_identical"]
    return 0 if ok else 1


def _default_platform() -> str:
    import shutil
    return "gpu" if Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") else "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2, help="TP size of the sp and mp variants (devices used)")
    ap.add_argument("--variants", default="mp,sp,tp1", help="comma list, run in this order: mp, sp, tp1")
    ap.add_argument("--platform", default=_default_platform(), choices=["gpu", "cpu"],
                    help="default: gpu where NVIDIA's driver is (the launcher itself never touches a device)")
    ap.add_argument("--isolate", default="auto", choices=["auto", "cuda", "jax"],
                    help="mp on GPUs: CUDA_VISIBLE_DEVICES=i per process (cuda), or every GPU visible and "
                         "JAX_LOCAL_DEVICE_IDS=i (jax); auto: cuda, then jax if that run fails")
    ap.add_argument("--model", default="llama-3-8b", help="named shape (NAME:layers=N: its first N) or 'tiny'")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--kernel-backend", default="auto", help="auto: Pallas on GPU, XLA on CPU")
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--adapters", default="0,100", help="comma list of adapter counts (0 = base)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--max-prefill-tokens", type=int, default=2048)
    ap.add_argument("--pool-gb", type=float, default=32.0, help="page pool size (all devices together)")
    ap.add_argument("--num-pages", type=int, default=0, help="page count (overrides --pool-gb)")
    ap.add_argument("--check-requests", type=int, default=16, help="requests of the token check (and warm-up)")
    ap.add_argument("--check-tokens", type=int, default=16, help="greedy tokens each")
    ap.add_argument("--weight-std", type=float, default=0.02, help="of the random weights")
    ap.add_argument("--compile-cache-dir", default=None, help="JAX's persistent cache (default: off)")
    ap.add_argument("--deadline-s", type=float, default=540, help="all variants together; a variant over it is killed")
    ap.add_argument("--variant-timeout-s", type=float, default=300, help="one variant (one try of mp) at most")
    ap.add_argument("--workdir", default=None, help="per-process result files (default: beside --out)")
    ap.add_argument("--out", default=None)
    # worker-only
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    return launcher(args)


if __name__ == "__main__":
    sys.exit(main())
