"""Runtime adapter management: vLLM's load/unload routes, the adapter-root confinement, and changes made
while other requests stream."""

from __future__ import annotations

import threading

import pytest

import slora_jax as sj
from tests.server.support import LATE_ADAPTER, MODEL, adapter_of, assert_error, expected, sse_events, token_prompts

LATE = LATE_ADAPTER[0]


def _models(http) -> set:
    return {m["id"] for m in http.get("/v1/models").json()["data"]}


def test_load_generate_unload_reload(http, client, reference, files):
    prompt = token_prompts(1, seed=61)[0]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": LATE, "lora_path": f"nested/{LATE}"})
    assert r.status_code == 200, r.text
    assert r.json()["adapter"]["rank"] == LATE_ADAPTER[1]
    try:
        assert LATE in _models(http)
        out = client.completions.create(model=LATE, prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        assert out.choices[0].token_ids == expected(reference, prompt, LATE, 8, ignore_eos=True).token_ids
        assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": LATE, "lora_path": f"nested/{LATE}"}),
                     400)  # the name is taken
    finally:
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": LATE}).status_code == 200
    assert LATE not in _models(http)
    assert_error(http.post("/v1/completions", json={"model": LATE, "prompt": prompt, "max_tokens": 2}), 404)
    assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": LATE}), 404)
    # An absolute path inside the root works too.
    r = http.post("/v1/load_lora_adapter", json={"lora_name": LATE, "lora_path": str(files["late"])})
    assert r.status_code == 200, r.text
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": LATE}).status_code == 200


@pytest.mark.parametrize("path,status", [
    ("../outside", 403),
    ("nested/../../outside", 403),
    ("{outside}", 403),  # absolute, outside the root
    ("link_out", 403),  # a symlink in the root to a folder outside
    ("sneaky", 403),  # a folder in the root whose weights file links outside
    ("does-not-exist", 400),
    ("a0/adapter_config.json", 400),  # a file, not a folder
    ("nested", 400),  # a folder without adapter files
])
def test_adapter_root_confinement(http, files, path, status):
    path = path.format(outside=files["outside"])
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path}), status)
    assert "evil" not in _models(http)


def test_bad_adapter_calls(http):
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": MODEL, "lora_path": "a0"}), 400)
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "a0", "lora_path": "a0"}), 400)
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400)
    assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"}), 404)


@pytest.mark.slow
def test_load_and_unload_while_streaming(http, reference):
    """While streams on a1, a0 and the base model run: unloading a1 is refused (in use), loading another
    adapter succeeds; every stream's answer stays exact. a1 unloads once its streams are done."""
    jobs = [("a1", p) for p in token_prompts(3, seed=71)] + [("a0", token_prompts(1, seed=72)[0]),
                                                            (MODEL, token_prompts(1, seed=73)[0])]
    results: dict[int, list] = {}
    first_chunk = [threading.Event() for _ in jobs]

    def stream(i, model, prompt):
        body = dict(model=model, prompt=prompt, max_tokens=200, temperature=0, stream=True, ignore_eos=True,
                    return_token_ids=True)
        with http.stream("POST", "/v1/completions", json=body) as resp:
            events = []
            for line in resp.iter_lines():
                events += sse_events([line])
                first_chunk[i].set()
                if events and events[-1] == "[DONE]":
                    break
            results[i] = events

    threads = [threading.Thread(target=stream, args=(i, m, p)) for i, (m, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    try:
        for e in first_chunk:
            assert e.wait(120)
        err = assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "a1"}), 400)
        assert "a1" in err["message"]
        r = http.post("/v1/load_lora_adapter", json={"lora_name": LATE, "lora_path": f"nested/{LATE}"})
        assert r.status_code == 200, r.text
    finally:
        for t in threads:
            t.join(180)
    want = reference.generate([p for _, p in jobs], adapters=[adapter_of(m) for m, _ in jobs],
                              sampling=sj.SamplingParams(max_tokens=200, ignore_eos=True))
    for i, (model, prompt) in enumerate(jobs):
        events = results[i]
        assert events[-1] == "[DONE]"
        ids = sum((e["choices"][0]["token_ids"] for e in events[:-1]), [])
        assert ids == want[i].token_ids, (model, i)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": LATE}).status_code == 200
    # Done streaming: a1 can go, and come back from the root.
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 200
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": "a1"}).status_code == 200
