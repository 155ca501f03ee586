"""`slora-jax bench` end to end on a tiny checkpoint, and the baselines it compares against."""

import json

import numpy as np
import pytest

import slora_jax as sj
from slora_jax.adapters.synthetic import random_lora
from slora_jax.bench.cli import main
from slora_jax.bench.merged import merge_lora, merged_into, merged_reference
from slora_jax.bench.trace import read_trace, synthetic_trace
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_checkpoint

CFG = tiny_llama_config()
METRICS = ("throughput_req_s", "throughput_tok_s", "latency_avg_s", "latency_p50_s", "latency_p90_s",
           "latency_p99_s", "first_token_latency_avg_s", "first_token_latency_p50_s", "first_token_latency_p90_s",
           "first_token_latency_p99_s", "slo_attainment", "user_satisfaction", "finished", "aborted", "unfinished",
           "total_time_s")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "model", CFG, seed=3, std=0.08)


@pytest.mark.slow
def test_bench_produces_every_metric_for_every_system(model_dir, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--model", str(model_dir), "--num-adapters", "4", "--alpha", "1", "--req-rate", "4", "--cv", "1",
            "--duration", "2", "--input-range", "4", "12", "--output-range", "2", "6", "--slo", "6", "--seed", "42",
            "--scheduler", "fcfs", "--kernel-backend", "xla", "--dtype", "float32", "--ranks", "4,8",
            "--backend", "slora,base,merged,peft", "--warmup", "0", "--num-pages", "256", "--no-progress",
            "--out", str(out), "--save-trace", str(tmp_path / "trace.jsonl")]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    trace = synthetic_trace(4, 1.0, 4, 1.0, 2, (4, 12), (2, 6), seed=42)
    assert read_trace(tmp_path / "trace.jsonl") == trace
    runs = {r["backend"]: r for r in res["runs"]}
    assert set(runs) == {"slora", "base", "merged", "peft"}
    for r in res["runs"]:
        for k in METRICS:
            assert k in r and r[k] is not None, (r["label"], k)
        assert r["num_requests"] == len(trace) == r["finished"] + r["aborted"] + r["unfinished"]
        assert r["finished"] == len(trace) and r["throughput_req_s"] > 0
        assert r["throughput_tok_s"] == pytest.approx(sum(t.output_len for t in trace) / r["total_time_s"])
        assert r["latency_p50_s"] <= r["latency_p90_s"] <= r["latency_p99_s"]
        assert 0 <= r["user_satisfaction"] <= r["slo_attainment"] <= 1
        assert r["total_time_s"] >= trace[-1].arrival_s
    s = runs["slora"]
    loads = s["adapter_loads"]
    for k in ("loads", "loads_hidden", "loads_visible", "hidden_fraction", "visible_time_s", "hidden_bytes"):
        assert k in loads
    assert loads["loads"] >= 1 and loads["loads_hidden"] + loads["loads_visible"] == loads["loads_used"]
    eng = s["engine"]
    assert 0 < eng["host_overhead_share"] <= 1 and eng["steps"] > 0 and eng["kernel_backend"] == "xla"
    parts = eng["host_breakdown_s"]
    assert set(parts) == {"inbox", "schedule", "inputs", "dispatch", "outputs", "other"}
    assert all(v >= 0 for v in parts.values()) and parts["inputs"] > 0 and parts["dispatch"] > 0
    # The parts account for the host time (dispatch is host time: the step wall clock minus device waits).
    assert sum(parts.values()) == pytest.approx(eng["host_time_s"], rel=0.05, abs=1e-3)
    disp = eng["dispatch_breakdown_s"]
    assert set(disp) == {"pack", "tables", "launch"} and disp["tables"] > 0  # adapter loads changed the tables
    assert sum(disp.values()) == pytest.approx(parts["dispatch"], rel=1e-6, abs=1e-9)
    assert eng["generated_tokens"] == sum(t.output_len for t in trace)
    assert runs["base"]["engine"]["adapter_loads"] == 0
    row = res["ratios"]["rows"][0]
    for k in ("vs_base", "vs_merged", "vs_peft"):
        assert row[k] > 0
    assert res["meta"]["platform"] == "cpu" and res["trace"]["num_requests"] == len(trace)
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_flags_exit_with_a_message(model_dir, tmp_path, capsys):
    assert main(["--model", "no-such-model", "--out", str(tmp_path / "x.json")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["--model", "tiny", "--backend", "slora,vllm", "--out", str(tmp_path / "x.json")]) == 2
    assert "--backend" in capsys.readouterr().err


@pytest.fixture(scope="module")
def engine(model_dir):
    return sj.Engine.from_pretrained(model_dir, config=sj.EngineConfig(dtype="float32", num_pages=256,
                                                                      kernel_backend="xla"))


@pytest.fixture(scope="module")
def lora():
    return random_lora(CFG, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), seed=5, std=0.3)


@pytest.mark.slow
def test_merged_weights_serve_what_the_adapter_serves(engine, lora):
    fused = engine.runner.params
    merged = merge_lora(fused, CFG, lora)
    w = np.asarray(fused["layers"]["wqkv"])
    m = lora.modules
    q, kv = CFG.q_size, CFG.kv_size
    got = np.asarray(merged["layers"]["wqkv"])
    for mod, cols in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv))):
        ml = m[mod]
        np.testing.assert_allclose(got[:, :, cols], merged_reference(w[:, :, cols], ml.a, ml.b, ml.scales),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(merged["layers"]["w_down"]),
                               merged_reference(np.asarray(fused["layers"]["w_down"]), m["down_proj"].a,
                                                m["down_proj"].b, m["down_proj"].scales), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["layers"]["w_gate_up"]), np.asarray(fused["layers"]["w_gate_up"]))
    engine.load_adapter_weights("m", lora)
    prompts = [[5, 9, 33, 7], [100, 3, 4, 5, 6, 200]]
    sp = sj.SamplingParams(max_tokens=6, ignore_eos=True)
    with_adapter = [o.token_ids for o in engine.generate(prompts, adapters="m", sampling=sp)]
    base = [o.token_ids for o in engine.generate(prompts, sampling=sp)]
    with merged_into(engine, lora):
        merged_out = [o.token_ids for o in engine.generate(prompts, sampling=sp)]
    assert merged_out == with_adapter and with_adapter != base
    assert [o.token_ids for o in engine.generate(prompts, sampling=sp)] == base  # originals restored


@pytest.mark.slow
def test_peft_baseline_generates_what_the_engine_generates(engine, model_dir, lora):
    from slora_jax.bench.peft_baseline import PeftBaseline, build_hf_model

    if "m" not in engine.adapters:
        engine.load_adapter_weights("m", lora)
    other = random_lora(CFG, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), seed=6, std=0.3)
    engine.load_adapter_weights("o", other)
    model = build_hf_model(CFG, str(model_dir), "float32", "cpu")
    server = PeftBaseline(model, CFG, {"m": lora, "o": other}, batch_size=4)
    prompts = [[5, 9, 33, 7], [100, 3, 4, 5, 6, 200]]
    sp = sj.SamplingParams(max_tokens=5, ignore_eos=True)
    seen = {}
    for name in ("m", "o", None, "m"):  # one slot of rank 8: swapped m -> o -> m, each with its own weights
        for p in prompts:
            want = engine.generate([p], adapters=name, sampling=sp)[0].token_ids
            got = server.generate([p], name, 5)[0].tolist()
            assert got == want, name
            seen.setdefault(name, []).append(got)
    assert server.swaps == 3
    assert seen["m"][:2] != seen["o"] and seen["o"] != seen[None]  # the adapters do change the tokens


def test_merge_handles_unrolled_layers_like_stacked(engine, lora):
    fused = engine.runner.params
    unrolled = dict(fused, layers=[{k: v[i] for k, v in fused["layers"].items()} for i in range(CFG.num_layers)])
    a, b = merge_lora(fused, CFG, lora), merge_lora(unrolled, CFG, lora)
    for k in a["layers"]:
        for i in range(CFG.num_layers):
            np.testing.assert_allclose(np.asarray(a["layers"][k][i]), np.asarray(b["layers"][i][k]), atol=1e-6)
