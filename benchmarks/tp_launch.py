"""Host time of launching one decode step with the devices idle, TP=1 and TP=2 side by side in one process.

    PYTHONPATH=. XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu L=32 N=80 \
        python benchmarks/tp_launch.py

A small model (hidden 256) with L unrolled layers; each engine's decode step (B=64) is captured from
its own loop, then called N times with the devices idle (``runner.pool`` ready before each call), and the
time of the call alone is reported (median, p25, min). benchmarks/NOTES.md, "Tensor parallelism with the
Pallas kernels", says what it showed.
"""
import os, time, jax, numpy as np, jax.numpy as jnp
import slora_jax as sj
from slora_jax.model.init import random_params
from slora_jax.model.random_checkpoint import tiny_llama_config
from slora_jax.engine.runner import pack_inputs
L = int(os.environ.get("L", 32)); B = 64
cfg = tiny_llama_config(num_layers=L, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2,
                        head_dim=32, vocab_size=512)
params = random_params(cfg, jnp.float32, seed=0)
res = {}
for tp in (1, 2):
    rng = np.random.default_rng(0)
    eng = sj.Engine(cfg, params, sj.EngineConfig(dtype="float32", tensor_parallel=tp, scan_layers=False,
                    num_pages=1024, max_batch_size=B, max_model_len=512, prefetch=False, async_scheduling=False))
    sp = sj.SamplingParams(max_tokens=100000, ignore_eos=True)
    for i in range(B):
        eng.add_request(rng.integers(3, cfg.vocab_size - 1, 8).tolist(), sampling=sp)
    while eng.stats()["running"] < B or eng.stats()["waiting"]:
        eng.step()
    runner = eng.runner
    cap = {}
    orig = runner.dispatch
    def rec(*a, **k):
        cap["x"] = (a, k); return orig(*a, **k)
    runner.dispatch = rec; eng.step(); eng.step(); runner.dispatch = orig
    res[tp] = (eng, runner, cap["x"])
stats = {}
for it in range(int(os.environ.get("N", 60))):
    for tp, (eng, runner, (a, k)) in res.items():
        mode, tables, inp, samp = a
        args, spec = runner._args(mode, tables, inp, samp, k.get("prev_tokens"))
        fn = runner._fn(mode, False, True, k["lora_groups"])
        buf_np, _ = pack_inputs(inp, samp)
        for variant in ("launch",):
            jax.block_until_ready(runner.pool)
            t0 = time.perf_counter()
            b = buf_np
            runner.pool, out = fn(args[0], args[1], runner.pool, args[3], b, args[5], *args[6:])
            stats.setdefault((tp, variant), []).append(time.perf_counter() - t0)
            jax.block_until_ready(out)
for key, v in sorted(stats.items()):
    v = np.array(v) * 1e3
    print(f"TP={key[0]} {key[1]}: median {np.median(v):.3f} ms, p25 {np.percentile(v, 25):.3f}, min {v.min():.3f}")
