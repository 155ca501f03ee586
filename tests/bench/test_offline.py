"""The offline benchmark (``slora-jax bench --mode offline``) and the floor it sets each run against."""

import json
import os
import subprocess
import sys

import pytest

from slora_jax.bench.floors import floor_seconds
from slora_jax.model.random_checkpoint import tiny_llama_config


def test_floor_takes_each_phase_at_its_own_roofline():
    cfg = tiny_llama_config()  # L=2, H=64, I=128, q=64, kv=32, V=256, untied
    L, H, I, q, kv, V = 2, 64, 128, 64, 32, 256
    params = L * (H * (q + 2 * kv) + q * H + 3 * H * I)
    weights = (params + 2 * V * H) * 2
    step = dict(decode_tokens=4, prompt_tokens=12, kv_read=40, attended=90, sampled=5, adapters=["a", "b"])
    bw, mm = 1e9, 1e12
    out = floor_seconds([step, dict(step, adapters=[])], cfg, 2, {"a": 1000, "b": 3000}, bw, mm)
    proj_b = [(weights + 4000) / bw, weights / bw]
    proj_f = (2 * params * 16 + 2 * H * V * 5) / mm
    attn_b = 2 * L * kv * 2 * (40 + 16) / bw
    attn_f = 4 * L * q * 90 / mm
    assert out["floor_s"] == pytest.approx(sum(max(b, proj_f) + max(attn_b, attn_f) for b in proj_b))
    assert out["overlap_floor_s"] == pytest.approx(sum(max(b + attn_b, proj_f + attn_f) for b in proj_b))
    assert out["steps"] == 2


@pytest.mark.slow  # a benchmark process at TP 1 and 2, ~15 s on two cores
def test_offline_mode_runs_base_and_adapters_and_reports_floors(tmp_path):
    out = tmp_path / "offline.json"
    cmd = [sys.executable, "-m", "slora_jax", "bench", "--mode", "offline", "--model", "tiny", "--num-requests", "10",
           "--input-len", "20", "--output-len", "5", "--adapters", "0,3", "--repeats", "1", "--max-batch-size", "4",
           "--max-prefill-tokens", "16", "--dtype", "float32", "--no-precompile", "--tensor-parallel", "1,2",
           "--out", str(out)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")  # TP=2 on simulated devices
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["device"] and rec["jax_version"] and rec["command"].startswith("python")
    assert {(r["tensor_parallel"], r["case"]) for r in rec["results"]} == {
        (tp, c) for tp in (1, 2) for c in ("base", "3 adapters")}
    tp2 = {r["case"]: r for r in rec["results"] if r["tensor_parallel"] == 2}
    runs = {r["case"]: r for r in rec["results"] if r["tensor_parallel"] == 1}
    for c, r in tp2.items():
        assert r["vs_tp1"] == pytest.approx(r["output_tok_s"] / runs[c]["output_tok_s"])
        assert runs[c]["vs_tp1"] == 1.0 and r["output_tokens"] == 10 * 5
    for r in runs.values():
        assert r["output_tokens"] == 10 * 5
        assert r["floor"]["floor_s"] > 0 and 0 < r["pct_of_floor"]
        assert r["counters"]["mixed_steps"] > 0 and r["counters"]["prefill_tokens"] == 10 * 20
    assert runs["3 adapters"]["mean_distinct_adapters"] > 0 and runs["base"]["mean_distinct_adapters"] == 0
    assert runs["3 adapters"]["vs_base"] == pytest.approx(runs["3 adapters"]["output_tok_s"] / runs["base"]["output_tok_s"])
    bad = subprocess.run([sys.executable, "-m", "slora_jax", "bench", "--mode", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--mode must be" in bad.stderr


@pytest.mark.slow  # an engine and three passes, ~6 s on two cores
def test_offline_disk_adapters_run_a_cold_then_a_warm_pass_with_read_counters(tmp_path):
    out = tmp_path / "offline.json"
    cmd = [sys.executable, "-m", "slora_jax", "bench", "--mode", "offline", "--model", "tiny", "--num-requests", "8",
           "--input-len", "12", "--output-len", "4", "--adapters", "0,8", "--repeats", "1", "--max-batch-size", "4",
           "--max-prefill-tokens", "16", "--dtype", "float32", "--adapter-source", "disk",
           "--distinct-folders", "3", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["adapter_source"] == "disk" and rec["disk_adapters"]["distinct_folders"] == 3
    runs = {r["case"]: r for r in rec["results"]}
    assert set(runs) == {"base", "8 adapters cold", "8 adapters warm"}
    cold, warm = runs["8 adapters cold"]["adapter_io"], runs["8 adapters warm"]["adapter_io"]
    # Every name is its own adapter: each read once in the cold pass, none in the warm pass.
    assert cold["adapter_reads"] == 8 and cold["adapter_read_bytes"] > 0 and cold["read_gbps"] > 0
    assert warm["adapter_reads"] == 0 and warm["adapter_host_evictions"] == 0 and warm["adapter_loads"] == 8
    # Precompile ran with the adapters' LoRA groups known: no pass compiles a step program on demand (the cold
    # pass once did, which the warm pass then found compiled, and cold/warm measured compilation).
    assert all(r["compiles"]["n"] == 0 for r in runs.values()), {c: r["compiles"] for c, r in runs.items()}
    links = sorted((tmp_path / "work" / "names").iterdir())
    assert len(links) == 8 + 3 and all(p.is_symlink() for p in links)  # 3 warm-up adapters, one per rank
    (summary,) = rec["cold"]
    assert summary["cold_vs_warm"] == pytest.approx(runs["8 adapters cold"]["output_tok_s"]
                                                     / runs["8 adapters warm"]["output_tok_s"])
    assert summary["cold_vs_base"] == pytest.approx(runs["8 adapters cold"]["vs_base"])
