"""guidellm runs a short synthetic sweep (synchronous, then as fast as it can) of streamed chat requests
against the real server; every request succeeds with the length asked, and the prompt sizes it reports are
what the server's own /tokenize counts for the same messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.clients.conftest import ADAPTER, API_KEY

REQUESTS, OUTPUT_TOKENS = 4, 4


@pytest.mark.slow
def test_guidellm_sweep(demo_server, demo_files, client_env, tmp_path):
    guidellm = shutil.which("guidellm", path=str(Path(sys.executable).parent)) or shutil.which("guidellm")
    assert guidellm, "guidellm is in the test extra"
    out = tmp_path / "guidellm.json"
    proc = subprocess.run(
        [guidellm, "run",
         "--backend", f"kind=openai_http,target={demo_server.url},model={ADAPTER},api_key={API_KEY}",
         "--profile", "kind=sweep,sweep_size=2",
         "--constraint", f"kind=max_requests,count={REQUESTS}",
         "--data", f"kind=synthetic_text,prompt_tokens=8,output_tokens={OUTPUT_TOKENS}",
         "--tokenizer", f"kind=huggingface_auto,model={demo_files[0]}",
         "--output", f"kind=json,path={out}", "--disable-console-interactive"],
        cwd=tmp_path, env=client_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    strategies = [b["config"]["strategy"]["type_"] for b in report["benchmarks"]]
    assert strategies == ["synchronous", "throughput"], strategies
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for bench in report["benchmarks"]:
        made = bench["scheduler_metrics"]["requests_made"]
        assert (made["successful"], made["errored"], made["incomplete"]) == (REQUESTS, 0, 0), made
        for req in bench["requests"]["successful"]:
            assert req["output_tokens"] == OUTPUT_TOKENS, req
            body = json.loads(req["request_args"])["body"]
            assert body["model"] == ADAPTER and body["stream"] is True
            counted = httpx.post(demo_server.url + "/tokenize", headers=headers,
                                 json={"model": ADAPTER, "messages": body["messages"]}).json()["count"]
            assert req["prompt_tokens"] == counted, (req["prompt_tokens"], counted)
