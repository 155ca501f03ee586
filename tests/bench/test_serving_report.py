"""benchmarks/serving.py's report: the ratio table and plot are rebuilt from a saved (possibly cut short)
study, and a baseline that finished nothing in its window gives no ratio instead of a crash."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def serving():
    spec = importlib.util.spec_from_file_location("serving_study", ROOT / "benchmarks" / "serving.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(label, backend, kb, req_s, gen_tokens, step_s, n=0, slo=None, hidden=None):
    return {"label": label, "backend": backend, "num_adapters": n, "kernel_backend": kb, "throughput_req_s": req_s,
            "throughput_tok_s": gen_tokens / step_s, "first_token_latency_avg_s": 0.5, "latency_avg_s": 5.0,
            "slo_attainment": slo, "adapter_loads": {"hidden_fraction": hidden, "hidden_fraction_busy": hidden},
            "engine": {"generated_tokens": gen_tokens, "step_time_s": step_s, "host_overhead_share": 0.2}}


def test_report_rebuilds_ratios_and_plot(serving, tmp_path):
    runs = [run("base[pallas]", "base", "pallas", 10.0, 2000, 16.0),
            run("S2 n=1000 [pallas]", "slora", "pallas", 6.0, 1500, 16.0, n=1000, hidden=0.99),
            run("S2 n=100 [pallas]", "slora", "pallas", 8.0, 1800, 16.0, n=100, hidden=0.97),
            # The xla backend finished no request inside its window, but generated tokens.
            run("S2 n=100 [xla]", "slora", "xla", 0.0, 9, 16.0, n=100, hidden=0.98)]
    (tmp_path / "serving.json").write_text(json.dumps({"settings": {"slo": 6.0}, "runs": runs,
                                                       "cdfs": {"base[pallas]": {"latency": [[1.0, 2.0], [0.5, 1.0]]}}}))
    assert serving.main(["--out-dir", str(tmp_path), "--report"]) == 0
    saved = json.loads((tmp_path / "serving.json").read_text())
    ratios = {r["target"]: r for r in saved["ratios"]}
    s2 = ratios["S2 n=1000 / base throughput >= 0.9"]
    assert s2["measured"] == pytest.approx(0.6) and s2["met"] is False
    assert ratios["S2 n=1000 / base generated tokens per engine second (info)"]["measured"] == pytest.approx(0.75)
    assert ratios["S2 n=100 pallas / xla throughput (info)"]["measured"] is None
    assert ratios["S2 n=100 pallas / xla generated tokens per engine second (info)"]["measured"] == pytest.approx(200)
    assert ratios["adapter loads hidden, all loads (min over n >= 100) >= 0.95"]["measured"] == pytest.approx(0.97)
    assert (tmp_path / "serving.png").stat().st_size > 0
