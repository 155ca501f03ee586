"""Adapters load by name on their first request (LoRAX style) from under --adapter-root, with the same
confinement and validation as /v1/load_lora_adapter; a second server started with the other new flags
(--no-load-adapters-on-request, --lora-modules, --tokenizer, --chat-template, --log-level) obeys them."""

from __future__ import annotations

import concurrent.futures
import json
import sys

import httpx
import pytest

from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter
from tests.server.conftest import ServerProcess
from tests.server.support import ALL, API_KEY, assert_error, expected, token_prompts


def test_a_folder_under_the_root_loads_on_first_request(http, files, reference):
    d = write_random_adapter(files["adapter_root"] / "auto1", tiny_llama_config(), rank=8, alpha=16,
                             target_modules=ALL, seed=77, init_scale=0.3)
    assert "auto1" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    prompt = token_prompts(1, seed=61)[0]
    r = http.post("/v1/completions", json={"model": "auto1", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                          "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    reference.load_adapter("auto1", d)
    assert r.json()["choices"][0]["token_ids"] == expected(reference, prompt, "auto1", 6, ignore_eos=True).token_ids
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["auto1"]["rank"] == 8


@pytest.mark.slow
def test_concurrent_first_requests_share_one_load(http, files):
    write_random_adapter(files["adapter_root"] / "auto2", tiny_llama_config(), rank=4, seed=78, init_scale=0.3)
    body = {"model": "auto2", "prompt": [5, 6, 7], "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: http.post("/v1/completions", json=body), range(6)))
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert [m["id"] for m in http.get("/v1/models").json()["data"]].count("auto2") == 1


@pytest.mark.parametrize("name", ["../outside", "link_out", "sneaky", "no-such-folder", "/etc", "nested"])
def test_names_outside_the_root_or_without_an_adapter_are_unknown_models(http, name):
    assert_error(http.post("/v1/completions", json={"model": name, "prompt": [5], "max_tokens": 1}), 404,
                 "model_not_found")
    assert name not in {m["id"] for m in http.get("/v1/models").json()["data"]}


def test_an_invalid_adapter_folder_is_a_400_that_says_why(http, files):
    d = write_random_adapter(files["adapter_root"] / "too_big", tiny_llama_config(), rank=4, seed=79)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 1000  # above the server's --max-lora-rank (64)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    err = assert_error(http.post("/v1/completions", json={"model": "too_big", "prompt": [5], "max_tokens": 1}), 400)
    assert "1000" in err["message"] or "rank" in err["message"], err


@pytest.fixture(scope="module")
def flags_server(files, server_env, tmp_path_factory):
    """Loading on request off; adapters through both --lora-modules forms; the tokenizer and a chat template
    from elsewhere; warnings only in the log."""
    extra = tmp_path_factory.mktemp("flags")
    tok_dir = extra / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text((files["model"] / "tokenizer.json").read_text())
    template = extra / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }};{% endfor %}>")
    a0, a1 = files["adapters"]["a0"], files["adapters"]["a1"]
    argv = [sys.executable, "-m", "slora_jax", "serve", "--model", str(files["model"]), "--port", "0",
            "--dtype", "float32", "--num-pages", "512", "--kernel-backend", "xla", "--served-model-name", "base",
            "--adapter-root", str(files["adapter_root"]), "--no-load-adapters-on-request",
            "--lora-modules", f"first={a0}", json.dumps({"name": "second", "path": str(a1)}),
            "--tokenizer", str(tok_dir), "--chat-template", str(template), "--log-level", "warning",
            "--max-loras", "2", "--max-cpu-loras", "4"]
    env = dict(server_env, SLORA_JAX_API_KEY=API_KEY)  # the key from the environment, not a flag
    proc = ServerProcess(argv, env)
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.mark.slow
def test_flags_server(flags_server, files):
    url = flags_server.url
    assert httpx.get(url + "/v1/models").status_code == 401  # SLORA_JAX_API_KEY applies
    h = {"Authorization": f"Bearer {API_KEY}"}
    ids = {m["id"] for m in httpx.get(url + "/v1/models", headers=h).json()["data"]}
    assert ids == {"base", "first", "second"}
    # auto1's folder (written by the test above, or now) is under the root, but loading on request is off.
    write_random_adapter(files["adapter_root"] / "auto3", tiny_llama_config(), rank=4, seed=80)
    assert_error(httpx.post(url + "/v1/completions", headers=h, json={"model": "auto3", "prompt": [5],
                                                                       "max_tokens": 1}), 404, "model_not_found")
    # The chat template from --chat-template, applied with the tokenizer from --tokenizer.
    r = httpx.post(url + "/tokenize", headers=h, json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["tokens"] == list("[user] hi;>".encode())
    r = httpx.post(url + "/v1/chat/completions", headers=h, timeout=120,
                   json={"model": "second", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len("[user] hi;>")
    # --log-level warning: no access log lines for the requests above.
    assert not [line for line in flags_server.lines if "POST /tokenize" in line], flags_server.log()
