"""Floors of serving work, from the steps an engine actually ran (``Engine.record_steps``), and the device
rates they are taken against, measured in the same run.

A step has two phases, each at its own roofline:
- projections: the weights (and the batch's adapters) read once vs 2 x parameters x tokens FLOPs (+ logits);
- attention: K/V rows read and written once vs 4 x q_size x keys attended FLOPs per layer.
``floor_seconds`` sums max(bytes / copy bandwidth, FLOPs / matmul rate) of each phase over the steps. At batch
256 an 8B model's decode projections are compute-bound on an H200 (256 FLOP per weight byte, above its
~180 FLOP/byte ridge), so a bytes-only floor would understate them. ``overlap_floor_s`` lets the phases
overlap (the max of a step's totals): a looser bound, reported beside it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

HBM_PEAK = 4.8e12  # the H200's datasheet HBM bandwidth, reported beside the measured copy bandwidth


def _time(fn, reps: int = 5) -> float:
    fn()  # compile and warm
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def copy_bandwidth(nbytes: int) -> dict:
    """Bytes read + written per second by the fastest of several device copies of ``nbytes``: benchmarks/
    bandwidth.py's reference (a Pallas copy among them) where it can be imported, else these XLA copies. On the
    H200 the uint32 ``x + 1`` set the reference (4.07-4.11 TB/s) where bf16's reached 3.2 TB/s."""
    try:
        from bandwidth import measure_copy_bandwidth  # the kernels' reference, run from benchmarks/
    except ImportError:
        measure_copy_bandwidth = None
    if measure_copy_bandwidth is not None:
        bw = measure_copy_bandwidth(nbytes)
        return dict(bytes_per_s=bw.bytes_per_s, method=bw.method, all=bw.candidates)
    n = nbytes // 4
    x32 = jnp.ones((n,), jnp.uint32)
    x16 = jnp.ones((2 * n,), jnp.bfloat16)
    ways = {
        "xla_add_u32": (jax.jit(lambda a: a + 1), x32),
        "xla_add_bf16": (jax.jit(lambda a: a + 1), x16),
        "xla_add_bf16_2d": (jax.jit(lambda a: (a.reshape(-1, 8192) + 1).reshape(-1)), x16),
    }
    rates = {k: 2 * nbytes / _time(lambda f=f, a=a: f(a).block_until_ready()) for k, (f, a) in ways.items()}
    best = max(rates, key=rates.get)
    return dict(bytes_per_s=rates[best], method=best, all=rates)


def matmul_rate(n: int) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / _time(lambda: f(a).block_until_ready())


def floor_seconds(trace: list, cfg, itemsize: int, adapter_bytes: dict, bw: float, mm: float) -> dict:
    """The floor of the steps in ``trace`` (see the module docstring): floor_s, overlap_floor_s and each
    phase's bytes and FLOPs time summed over steps. ``adapter_bytes``: name -> bytes of its A and B."""
    L, H, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    kv = cfg.kv_size
    mat_params = L * (H * (cfg.q_size + 2 * kv) + cfg.q_size * H + 3 * H * cfg.intermediate_size)
    weight_bytes = (mat_params + V * H * (1 if cfg.tie_word_embeddings else 2)) * itemsize
    out = dict(floor_s=0.0, overlap_floor_s=0.0, proj_bytes_s=0.0, proj_flops_s=0.0, attn_bytes_s=0.0,
               attn_flops_s=0.0, steps=len(trace))
    for s in trace:
        tokens = s["decode_tokens"] + s["prompt_tokens"]
        adapters = sum(adapter_bytes.get(a, 0) for a in s["adapters"])
        pb = (weight_bytes + adapters) / bw
        # LoRA FLOPs (2 x rank x (d_in + d_out) per token and module) are under 1% of the base's: left out.
        pf = (2 * mat_params * tokens + 2 * H * V * s["sampled"]) / mm
        ab = 2 * L * kv * itemsize * (s["kv_read"] + tokens) / bw
        af = 4 * L * cfg.q_size * s["attended"] / mm
        out["floor_s"] += max(pb, pf) + max(ab, af)
        out["overlap_floor_s"] += max(pb + ab, pf + af)
        for k, v in (("proj_bytes_s", pb), ("proj_flops_s", pf), ("attn_bytes_s", ab), ("attn_flops_s", af)):
            out[k] += v
    return out


def step_breakdown(trace: list, cfg, itemsize: int, adapter_bytes: dict, bw: float, mm: float) -> dict:
    """Device time by kind of step, paced by when the host could queue the next step: step k ran from about
    queued_at[k+1] to queued_at[k+2] (the host queues k+2 once k is read), beside its floor."""
    out: dict = {}
    for k in range(len(trace) - 2):
        s = trace[k]
        key = "mixed" if s["mode"] == "mixed" else f"decode B={s['tokens']}"
        dt = trace[k + 2]["queued_at"] - trace[k + 1]["queued_at"]
        fl = floor_seconds([s], cfg, itemsize, adapter_bytes, bw, mm)["floor_s"]
        e = out.setdefault(key, dict(steps=0, time_s=0.0, floor_s=0.0))
        e["steps"] += 1
        e["time_s"] += dt
        e["floor_s"] += fl
    for e in out.values():
        e["pct_of_floor"] = 100 * e["floor_s"] / e["time_s"] if e["time_s"] else 0.0
        e["mean_step_ms"] = 1e3 * e["time_s"] / e["steps"]
    return out
