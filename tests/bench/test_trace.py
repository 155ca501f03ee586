"""The synthetic trace against S-LoRA's own generator, its statistics, and JSONL replay."""

import json

import numpy as np
import pytest

from slora_jax.bench.trace import (TraceRequest, prompt_tokens, read_trace, resolve_adapters, synthetic_trace,
                                   with_base_model, write_trace)
from slora_jax.errors import ConfigError


def slora_generate_requests(num_adapters, alpha, req_rate, cv, duration, input_range, output_range, seed=42):
    """S-LoRA's benchmarks/trace.py generate_requests, as published (global legacy numpy generator)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        tot_req = int(req_rate * duration)
        probs = np.random.power(alpha, tot_req)
        ind = (probs * num_adapters).astype(int)
        input_lens = np.random.randint(input_range[0], input_range[1], tot_req)
        output_lens = np.random.randint(output_range[0], output_range[1], tot_req)
        tic = 0
        shape = 1 / (cv * cv)
        scale = cv * cv / req_rate
        intervals = np.random.gamma(shape, scale, tot_req)
        out = []
        for i in range(tot_req):
            tic += intervals[i]
            out.append((tic, int(ind[i]), int(input_lens[i]), int(output_lens[i])))
        return out
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize("n,alpha,rate,cv", [(5, 1.0, 10, 1.0), (1000, 0.5, 2.5, 2.0), (2000, 1.3, 7, 0.5)])
def test_same_requests_as_slora_public_code(n, alpha, rate, cv):
    ref = slora_generate_requests(n, alpha, rate, cv, 60, [8, 512], [8, 512], seed=42)
    got = synthetic_trace(n, alpha, rate, cv, 60, (8, 512), (8, 512), seed=42)
    assert len(got) == len(ref) == int(rate * 60)
    for g, (t, a, i, o) in zip(got, ref):
        assert (g.adapter, g.input_len, g.output_len) == (a, i, o)
        assert g.arrival_s == pytest.approx(t, rel=1e-12)


def test_statistics_of_a_long_trace():
    tr = synthetic_trace(50, 1.0, 100.0, 2.0, 200, (8, 512), (8, 64), seed=3)
    gaps = np.diff([0.0] + [r.arrival_s for r in tr])
    assert gaps.mean() == pytest.approx(1 / 100.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.08)
    counts = np.bincount([r.adapter for r in tr], minlength=50)
    assert counts.min() > 0.75 * counts.mean() and counts.max() < 1.25 * counts.mean()  # alpha 1: uniform
    ins = np.array([r.input_len for r in tr])
    outs = np.array([r.output_len for r in tr])
    assert ins.min() == 8 and ins.max() == 511 and outs.min() == 8 and outs.max() == 63
    skew = synthetic_trace(100, 0.3, 100.0, 1.0, 100, (8, 16), (8, 16), seed=3)
    share = np.mean([r.adapter < 10 for r in skew])
    assert share == pytest.approx(0.1 ** 0.3, abs=0.03)  # P(U^(1/alpha) < 0.1)
    assert all(0 <= r.adapter < 100 for r in skew)


def test_base_model_trace_and_bad_flags():
    tr = synthetic_trace(0, 1.0, 5, 1.0, 4, (8, 16), (8, 16))
    assert tr and all(r.adapter is None for r in tr)
    with pytest.raises(ConfigError, match="--input-range"):
        synthetic_trace(5, 1.0, 5, 1.0, 4, (16, 8), (8, 16))
    with pytest.raises(ConfigError, match="--req-rate"):
        synthetic_trace(5, 1.0, 0, 1.0, 4, (8, 16), (8, 16))
    with pytest.raises(ConfigError, match="--num-adapters"):
        synthetic_trace(-1, 1.0, 5, 1.0, 4, (8, 16), (8, 16))


def test_jsonl_round_trip_and_errors(tmp_path):
    tr = synthetic_trace(7, 1.0, 5, 1.0, 4, (8, 16), (8, 16))
    tr = tr + [TraceRequest(99.0, "named", 3, 4), TraceRequest(100.0, None, 2, 2)]
    back = read_trace(write_trace(tmp_path / "t.jsonl", tr))
    assert back == tr
    assert with_base_model(back)[0] == TraceRequest(tr[0].arrival_s, None, tr[0].input_len, tr[0].output_len)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"arrival_s": 0.5, "adapter": 1, "input_len": 3, "output_len": 2}) + "\n"
                   + json.dumps({"arrival_s": 1.0, "adapter": 1, "input_len": 0, "output_len": 2}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: input_len"):
        read_trace(bad)
    bad.write_text('{"arrival_s": 1.0, "adapter": 1}\n')
    with pytest.raises(ConfigError, match="missing field"):
        read_trace(bad)
    bad.write_text("not json\n")
    with pytest.raises(ConfigError, match=":1: not JSON"):
        read_trace(bad)


def test_resolve_adapters_and_prompts():
    tr = [TraceRequest(0, 1, 3, 2), TraceRequest(1, "x", 4, 2), TraceRequest(2, None, 5, 2)]
    assert resolve_adapters(tr, ["a", "b", "x"]) == ["b", "x", None]
    with pytest.raises(ConfigError, match="index 1"):
        resolve_adapters(tr, ["a"])
    with pytest.raises(ConfigError, match="'x'"):
        resolve_adapters(tr, ["a", "b"])
    p = prompt_tokens(tr, 256, seed=1)
    assert [len(x) for x in p] == [3, 4, 5] and all(3 <= t < 256 for x in p for t in x)
    assert p == prompt_tokens(tr, 256, seed=1)
