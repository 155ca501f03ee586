"""lm-evaluation-harness (`local-completions`, its remote tokenizer through /tokenize) runs a loglikelihood
task and a generate_until task from a local file against the real server; the log-likelihoods and
generations it records equal the in-process engine's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import slora_jax as sj
from slora_jax.model.checkpoint import Tokenizer
from tests.clients.conftest import ADAPTER, API_KEY

TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def lm_eval_run(demo_server, client_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval")
    model_args = (f"model={ADAPTER},base_url={demo_server.url}/v1/completions,auth_token={API_KEY},"
                  "num_concurrent=2,max_retries=1,max_length=512")
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
         "--tasks", "slora_tiny_choice,slora_tiny_generate", "--include_path", ".", "--output_path", str(out),
         "--log_samples"],
        cwd=TASKS, env=dict(client_env, OPENAI_API_KEY=API_KEY), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Using remote tokenizer" in proc.stderr + proc.stdout  # it found /tokenizer_info and /tokenize
    samples = {}
    for task in ("slora_tiny_choice", "slora_tiny_generate"):
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    (results,) = out.rglob("results_*.json")
    return samples, json.loads(results.read_text())


def docs() -> list[dict]:
    return [json.loads(line) for line in (TASKS / "tiny_qa.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok(demo_files):
    return Tokenizer.from_dir(demo_files[0])


@pytest.mark.slow
def test_loglikelihood_task_matches_the_engine(lm_eval_run, demo_reference, tok):
    samples, results = lm_eval_run
    rows = sorted(samples["slora_tiny_choice"], key=lambda s: s["doc_id"])
    assert len(rows) == len(docs())
    for doc, row in zip(docs(), rows):
        assert len(row["filtered_resps"]) == len(doc["choices"])
        for choice, (ll, greedy) in zip(doc["choices"], row["filtered_resps"]):
            # lm-eval's split: the continuation is what the whole text adds to the context's tokens.
            context = tok.encode(doc["question"], add_special_tokens=False)
            whole = tok.encode(doc["question"] + " " + choice, add_special_tokens=False)
            logits = demo_reference.logits([whole[:-1]], adapters=[ADAPTER])[0].astype(np.float64)
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            positions = range(len(context), len(whole))
            want = sum(logp[i - 1, whole[i]] for i in positions)
            assert float(ll) == pytest.approx(want, abs=1e-3), (doc, choice)
            assert (greedy == "True") == all(logp[i - 1].argmax() == whole[i] for i in positions)
    acc = results["results"]["slora_tiny_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0


@pytest.mark.slow
def test_generate_until_task_matches_the_engine(lm_eval_run, demo_reference, tok):
    samples, _ = lm_eval_run
    rows = sorted(samples["slora_tiny_generate"], key=lambda s: s["doc_id"])
    assert len(rows) == len(docs())
    for doc, row in zip(docs(), rows):
        prompt = tok.encode(doc["question"], add_special_tokens=False)
        out = demo_reference.generate([prompt], adapters=[ADAPTER],
                                      sampling=sj.SamplingParams(max_tokens=8, temperature=0.0))[0]
        want = tok.decode(out.token_ids).split("\n")[0]
        assert row["filtered_resps"][0] == want, (doc, row["filtered_resps"])
