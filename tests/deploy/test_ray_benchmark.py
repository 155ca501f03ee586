"""benchmarks/ray_serving.py end to end on the CPU (--tiny): both phases run over HTTP and the JSON holds what
the issue's targets read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.deploy.conftest import ROOT


@pytest.mark.slow
def test_tiny_dry_run_writes_both_phases(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    out = tmp_path / "ray_serving.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own Ray instance
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ray_serving.py"), "--tiny", "--out", str(out),
                           "--num-requests", "12", "--latency-requests", "5", "--compile-cache", str(tmp_path / "cc")],
                          capture_output=True, text=True, timeout=400, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["jax_version"] and r["date"] and "ray_serving.py" in r["command"]
    for phase in ("direct", "ray"):
        assert r[phase]["requests"] == 12 and r[phase]["requests_per_s"] > 0, r[phase]
        assert r[phase]["one_at_a_time"]["p50_ms"] > 0
    # Two replicas served the base model and every adapter; each adapter was answered by one that holds it.
    holders = r["ray"]["replicas"]
    assert len(holders["base"]) == 2, holders
    for name, replica in r["ray"]["served_by"].items():
        assert replica in holders[name], (name, replica, holders)
    assert set(r["ray"]["served_by"]) == {f"lora{i}" for i in range(4)}
    # Every trace request is counted on the replica that answered it (test_ray.py checks that both serve).
    per_replica = r["ray"]["per_replica"]
    assert set(per_replica) <= set(holders["base"]), (per_replica, holders)
    assert sum(v["requests"] for v in per_replica.values()) == 12, per_replica
    # Each answer through Ray carried Server-Timing from the ingress and the replica: the parts are times.
    parts = r["ray"]["one_at_a_time"]["parts_p50_ms"]
    assert 0 < parts["replica"] < r["ray"]["one_at_a_time"]["p90_ms"] and parts["ingress_without_replica"] >= 0
    assert r["ratios"]["ray"]["throughput"] > 0 and "added_latency_p50_ms" in r["ratios"]["ray"]
