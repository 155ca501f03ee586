"""The notebooks run top to bottom (nbclient, python3 kernel), are stored without outputs, and plot
benchmark results in the formats the benchmark scripts write."""

import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_kernels.ipynb", "03_train_and_serve.ipynb", "04_slora_workload.ipynb"]
CELL_TIMEOUT_S = 300


def execute(nb):
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == kind]


def text_of(nb):
    return "".join(o.get("text", "") for o in outputs(nb, "stream"))


def test_every_notebook_is_there():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before committing"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name):
    nb = execute(nbformat.read(NOTEBOOKS / name, as_version=4))  # raises CellExecutionError on any failure
    if name != "02_kernels.ipynb":  # its figures are the GPU results' (test_committed_results_are_plotted)
        assert outputs(nb, "display_data"), f"{name} drew no figure"
    text = text_of(nb)
    if name == "03_train_and_serve.ipynb":
        follows = dict(re.findall(r"^(\S+)\s+follows the cycle on (\d+)%", text, re.M))
        assert int(follows["cycle"]) >= 90 and int(follows["None"]) <= 30, follows
        assert "finish reasons: ['length']" in text
    if name == "02_kernels.ipynb":
        assert "relative difference pallas vs xla" in text


# ------------------------------------------------------------------------------------------ result plots


def _kernel_results() -> dict:
    """Shaped as benchmarks/kernels.py writes it."""
    cases = []
    for op in ("lora_decode", "paged_decode_attention"):
        for i, t in enumerate((1, 64, 256)):
            xla, pallas = 40.0 * (i + 1), 25.0 * (i + 1)
            cases.append(dict(op=op, name=f"T={t} r=16", pallas_us=pallas, xla_us=xla, speedup_vs_xla=xla / pallas,
                              floor_us=0.5 * pallas, rel_err=1e-3, bytes=10**6, flops=10**7))
    cases.append(dict(op="write_kv", name="skipped case", skipped="time budget", bytes=1, flops=1))
    return dict(device="NVIDIA H200 (gpu)", jax_version="0.11.2", date="2025-01-01T00:00:00+00:00",
                command="python kernels.py", dtype="bfloat16", copy_bandwidth_GBps=4000.0,
                matmul_bf16_TFLOPs=700.0, cases=cases, total_s=100.0)


def _engine_decode_results() -> dict:
    """Shaped as benchmarks/engine_decode.py writes it."""
    cases = [dict(backend=b, batch=B, mode=m, step_s=0.005 + B * (1e-5 if m == "base" else 2e-5), floor_s=0.004,
                  distinct_adapters=B if m == "lora" else 0)
             for b in ("xla", "pallas") for B in (1, 32, 128) for m in ("lora", "base")]
    return dict(device="NVIDIA H200", platform="gpu", jax="0.11.2", model="llama-2-7b", dtype="bfloat16", cases=cases)


def _workload_results() -> dict:
    """Shaped as `slora-jax bench` writes it: rows built with its own metrics and ratio code."""
    from slora_jax.bench.cli import ratios
    from slora_jax.bench.metrics import RequestRecord, summarize

    rng = np.random.default_rng(0)
    runs = []
    for backend, ns in (("base", [0]), ("merged", [1]), ("slora", [5, 100, 1000]), ("peft", [5])):
        for n in ns:
            recs = []
            for i in range(20):
                arrival = 0.1 * i
                rec = RequestRecord(i, None, 16, 8, arrival, first_token_s=arrival + rng.uniform(0.1, 2.0),
                                    finish_s=arrival + 3.0, finish_reason="length", generated=8)
                recs.append(rec)
            summary = summarize(recs, 5.0, slo=1.0)
            summary["adapter_loads"] = {"loads": n, "hidden_fraction": 0.9}
            summary["engine"] = {}
            runs.append({"label": f"{backend} n={n}", "backend": backend, "num_adapters": n, "kernel_backend": "pallas",
                         "scheduler": "fcfs", **summary})
    return {"meta": {"device": "NVIDIA H200", "jax": "0.11.2"},
            "trace": {"num_requests": 20, "req_rate": 2.0, "cv": 1.0, "alpha": 1.0}, "runs": runs,
            "ratios": ratios(runs)}


def _results_only(name: str) -> nbformat.NotebookNode:
    """The notebook's setup and results cells alone (the part that reads benchmarks/results)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    keep = [c for c in nb.cells if {"setup", "results"} & set(c.metadata.get("tags", []))]
    assert any("results" in c.metadata.get("tags", []) for c in keep), f"{name} has no cells tagged 'results'"
    nb.cells = keep
    return nb


@pytest.mark.parametrize("name, files, figures", [
    ("02_kernels.ipynb", {"kernels.json": _kernel_results, "decode.json": _engine_decode_results}, 2),
    pytest.param("04_slora_workload.ipynb", {"bench.json": _workload_results}, 1, marks=pytest.mark.slow),
])
def test_committed_results_are_plotted(tmp_path, monkeypatch, name, files, figures):
    for fname, make in files.items():
        (tmp_path / fname).write_text(json.dumps(make()))
    (tmp_path / "notes.json").write_text("[1, 2, 3]")  # not a results file: ignored
    monkeypatch.setenv("SLORA_BENCH_RESULTS", str(tmp_path))  # the kernel inherits the environment
    nb = execute(_results_only(name))
    assert len(outputs(nb, "display_data")) == figures
    assert "No committed" not in text_of(nb)


@pytest.mark.slow  # a notebook kernel each, ~3 s; the first plotting test above runs in the quick subset
@pytest.mark.parametrize("name", ["02_kernels.ipynb", "04_slora_workload.ipynb"])
def test_missing_results_give_a_note(tmp_path, monkeypatch, name):
    monkeypatch.setenv("SLORA_BENCH_RESULTS", str(tmp_path / "none"))
    nb = execute(_results_only(name))
    assert "No committed" in text_of(nb) and not outputs(nb, "display_data")
