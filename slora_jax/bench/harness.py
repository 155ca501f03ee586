"""Replay a trace against a running engine, in process, on the trace's own clock.

A feeder thread submits each request at its arrival time (``Engine.add_request`` is thread-safe) while this
thread drives ``Engine.step()``, as a server's engine loop would. Latencies are measured from each request's
*scheduled* arrival, so a request delayed before the engine saw it is charged for the delay.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from slora_jax.bench.metrics import RequestRecord, summarize
from slora_jax.bench.trace import TraceRequest, prompt_tokens
from slora_jax.errors import SloraError
from slora_jax.types import SamplingParams

# engine.stats() counters whose change over a run is reported.
_DELTA_KEYS = ("steps", "mixed_steps", "decode_steps", "generated_tokens", "prompt_tokens", "host_time_s",
               "step_time_s", "exposed_host_s", "preemptions", "adapter_loads", "adapter_evictions", "adapter_load_bytes",
               "adapter_host_loads", "adapter_host_evictions", "adapter_prefetch_loads",
               "compiled_shapes")  # programs compiled during the run: its times include their compilation


@dataclass
class RunResult:
    """Per-request records, the run's length, and the engine's counters over the run."""

    records: list[RequestRecord]
    total_time_s: float
    engine: dict = field(default_factory=dict)
    loads: dict = field(default_factory=dict)

    def summary(self, slo: float) -> dict:
        out = summarize(self.records, self.total_time_s, slo)
        out["engine"] = dict(self.engine)
        out["adapter_loads"] = dict(self.loads)
        return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, leave=False, dynamic_ncols=True)


def run_trace(engine, trace: Sequence[TraceRequest], adapters: Sequence[Optional[str]], *,
              time_limit_s: Optional[float] = None, progress: bool = True, desc: str = "bench",
              prompt_seed: int = 0) -> RunResult:
    """Serve ``trace`` (``adapters[i]`` = the adapter name of request i, or None) and record every request.

    ``time_limit_s``: from the start, abort whatever is still unfinished (counted as unfinished) and stop.
    Greedy decoding, EOS ignored, exactly ``output_len`` tokens per request (as the paper's workload)."""
    if len(adapters) != len(trace):
        raise ValueError(f"{len(adapters)} adapter names for {len(trace)} requests")
    n = len(trace)
    prompts = prompt_tokens(trace, engine.model_config.vocab_size, seed=prompt_seed)
    records = [RequestRecord(i, adapters[i], r.input_len, r.output_len, r.arrival_s) for i, r in enumerate(trace)]
    ids = {f"bench-{i}": i for i in range(n)}
    done = [0]
    lock = threading.Lock()
    failures: list[Exception] = []  # unexpected errors of add_request: re-raised after the run
    submitted = [False] * n
    wake = threading.Event()
    stop = threading.Event()
    t0_box: list[float] = []

    def listener(out):
        if out.finished:
            rec = records[ids[out.request_id]]
            t0 = t0_box[0]
            m = out.metrics
            rec.finish_reason = out.finish_reason
            rec.generated = len(out.token_ids)
            rec.error = out.error
            rec.finish_s = (m.finish_time if m.finish_time is not None else time.monotonic()) - t0
            if m.first_token_time is not None:
                rec.first_token_s = m.first_token_time - t0
            with lock:
                done[0] += 1

    def feed():
        t0 = t0_box[0]
        for i, r in enumerate(trace):
            if stop.is_set():
                return
            delay = t0 + r.arrival_s - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            sp = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
            try:
                engine.add_request(prompts[i], adapter=adapters[i], sampling=sp, request_id=f"bench-{i}",
                                   listener=listener)
            except Exception as e:  # refused (too long, queue full): an abort that never ran
                rec = records[i]
                rec.finish_reason, rec.error = "abort", f"{type(e).__name__}: {e}"
                rec.finish_s = time.monotonic() - t0
                with lock:
                    done[0] += 1
                if not isinstance(e, SloraError):
                    failures.append(e)
            submitted[i] = True
            wake.set()

    before = engine.stats()
    loads_from = engine.adapter_load_count()
    bar = _progress(n, desc, progress)
    t0_box.append(time.monotonic())
    feeder = threading.Thread(target=feed, name="bench-feeder", daemon=True)
    feeder.start()
    t0 = t0_box[0]
    timed_out = False
    try:
        while done[0] < n:
            if time_limit_s is not None and time.monotonic() - t0 > time_limit_s:
                timed_out = True
                break
            if engine.has_unfinished():
                engine.step()
            else:
                wake.wait(0.05)
                wake.clear()
            if bar.n != done[0]:
                bar.n = done[0]
                bar.refresh()
    finally:
        stop.set()
        feeder.join()
        bar.close()
    end = time.monotonic() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} request(s) could not be submitted") from failures[0]
    if timed_out:  # leave the engine empty for the next run; these requests count as unfinished
        for i in range(n):
            if submitted[i] and records[i].finish_reason is None:
                engine.abort(f"bench-{i}")
        while engine.has_unfinished():
            engine.step()
        for rec in records:
            if rec.finish_s is None or rec.finish_s > end:
                rec.finish_reason, rec.finish_s, rec.first_token_s = None, None, (
                    rec.first_token_s if rec.first_token_s is not None and rec.first_token_s <= end else None)
        total = end
    else:
        total = max([r.finish_s for r in records if r.finish_s is not None] + [1e-9])
    after = engine.stats()
    delta = {k: after[k] - before[k] for k in _DELTA_KEYS if k in after and k in before}
    delta["host_overhead_share"] = (delta["exposed_host_s"] / delta["step_time_s"]) if delta.get("step_time_s") else 0.0
    delta["host_busy_share"] = delta["host_time_s"] / delta["step_time_s"] if delta.get("step_time_s") else 0.0
    for key in ("host_breakdown_s", "dispatch_breakdown_s"):
        if key in after:
            delta[key] = {k: v - before[key].get(k, 0.0) for k, v in after[key].items()}
    delta["kernel_backend"] = after.get("kernel_backend")
    delta["total_pages"] = after.get("total_pages")
    delta["timed_out"] = timed_out
    return RunResult(records, total, delta, engine.adapter_load_summary(loads_from))
