"""benchmarks/kernels.py end to end on the CPU (tiny shapes, interpret mode), one replica per device of a
2-device simulated host: every op is checked against its reference on every replica, and the JSON says so;
MBGMV's kernels are also timed apart."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_smoke_with_one_replica_per_device(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--cpu-smoke", "--replicas", "0",
                           "--lora-decode-parts", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["loop_overhead_us"] > 0
    rows = report["cases"]
    assert {r["op"] for r in rows} == {"lora_decode", "lora_prefill", "paged_decode_attention", "prefill_attention",
                                       "write_kv"}
    for r in rows:
        assert "error" not in r, r
        assert r["replicas"] == 2 and r["replicas_differ"] is False, r
        assert r["rel_err"] < 1e-4, r
        assert r["pallas_aggregate_GBps"] > 0, r
    decode = [r for r in rows if r["op"] == "lora_decode"]
    assert {r["shape"] for r in decode} == {"tiny", "tiny_shared"}
    for r in decode:
        assert r["part_shrink_us"] > 0 and r["part_expand_us"] > 0  # MBGMV's two kernels timed apart
        assert "part_shrink_pct_copy_bw" not in r  # the op's bytes are not a part's
        # The per-token kernels (the former default) timed and checked beside the grouped default.
        assert r["pallas_none_us"] > 0 and r["pallas_none_rel_err"] < 1e-4, r
    assert report["copy_bandwidth_method"] in report["copy_bandwidth_candidates_GBps"]
