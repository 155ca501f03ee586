"""Every error path answers in the OpenAI error format with the right status, and disturbs no other request."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.server.support import API_KEY, LIMITED, MODEL, assert_error, expected, sse_events, token_prompts

OK = dict(model=MODEL, prompt=[5, 6, 7], max_tokens=2)
CHAT_OK = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)

BAD_COMPLETIONS = [
    ({"model": "no-such-adapter"}, 404, "model_not_found"),
    ({"temperature": -1}, 400, None),
    ({"top_p": 0}, 400, None),
    ({"top_p": 1.5}, 400, None),
    ({"top_k": -5}, 400, None),
    ({"max_tokens": 0}, 400, None),
    ({"max_tokens": "5"}, 400, None),
    ({"max_tokens": 10**6}, 400, None),
    ({"max_tokens": 250, "prompt": list(range(3, 13))}, 400, None),  # prompt + max_tokens > context (256)
    ({"n": 0}, 400, None),
    ({"n": 10**4}, 400, None),
    ({"seed": "x"}, 400, None),
    ({"prompt": []}, 400, None),
    ({"prompt": [[]]}, 400, None),
    ({"prompt": [300]}, 400, None),  # outside the 256-token vocabulary
    ({"prompt": [-1]}, 400, None),
    ({"prompt": 5}, 400, None),
    ({"prompt": [1.5, 2]}, 400, None),
    ({"prompt": None}, 400, None),
    ({"prompt": list(range(3, 253)) + [3] * 10}, 400, None),  # longer than the context
    ({"stop": ["x"] * 40}, 400, None),
    ({"stop_token_ids": [999]}, 400, None),
    ({"logprobs": 21}, 400, None),  # vLLM's and OpenAI's limit is 20
    ({"presence_penalty": 0.5}, 400, None),
    ({"logit_bias": {"5": 1.0}}, 400, None),
    ({"best_of": 3}, 400, None),
    ({"stream": "yes"}, 400, None),
]

BAD_CHAT = [
    ({"model": "no-such-adapter"}, 404, "model_not_found"),
    ({"messages": []}, 400, None),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, None),
    ({"messages": "hi"}, 400, None),
    ({"top_logprobs": 2}, 400, None),  # needs logprobs: true
    ({"top_logprobs": 21, "logprobs": True}, 400, None),
    ({"response_format": {"type": "json_object"}}, 400, None),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, None),
    ({"max_tokens": 3, "max_completion_tokens": 4}, 400, None),
]


@pytest.mark.parametrize("patch,status,code", BAD_COMPLETIONS)
def test_bad_completion_requests(http, patch, status, code):
    assert_error(http.post("/v1/completions", json={**OK, **patch}), status, code)


@pytest.mark.parametrize("patch,status,code", BAD_CHAT)
def test_bad_chat_requests(http, patch, status, code):
    assert_error(http.post("/v1/chat/completions", json={**CHAT_OK, **patch}), status, code)


def test_malformed_bodies_and_routes(http):
    assert_error(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                 400)
    assert_error(http.post("/v1/completions", json=[1, 2, 3]), 400)
    assert_error(http.post("/v1/completions", json={"prompt": [1]}), 400)  # no model
    assert_error(http.get("/v1/no-such-route"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_auth(server, http):
    for path, method in [("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/load_lora_adapter", "POST"),
                         ("/v1/unload_lora_adapter", "POST"), ("/openapi.json", "GET")]:
        assert_error(httpx.request(method, server.url + path, json=OK), 401, "invalid_api_key")
        assert_error(httpx.request(method, server.url + path, json=OK, headers={"Authorization": "Bearer nope"}),
                     401, "invalid_api_key")
        assert_error(httpx.request(method, server.url + path, json=OK, headers={"Authorization": API_KEY}), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # probes and scrapers need no key
    assert httpx.get(server.url + "/metrics").status_code == 200
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_openai_client_error_types(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=[1, 2], max_tokens=2)
    assert "nope" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=2, temperature=-3)
    assert "temperature" in e.value.message


@pytest.mark.slow
def test_bad_requests_do_not_disturb_a_running_stream(http, reference):
    """A long stream runs while every bad request above is sent; its answer is still exact."""
    prompt = token_prompts(1, seed=51)[0]
    result = {}

    def stream():
        with http.stream("POST", "/v1/completions", json=dict(model="a0", prompt=prompt, max_tokens=60,
                                                              temperature=0, stream=True, ignore_eos=True,
                                                              return_token_ids=True)) as resp:
            result["events"] = sse_events(resp.iter_lines())

    t = threading.Thread(target=stream)
    t.start()
    for patch, status, code in BAD_COMPLETIONS:
        assert_error(http.post("/v1/completions", json={**OK, **patch}), status, code)
    for patch, status, code in BAD_CHAT:
        assert_error(http.post("/v1/chat/completions", json={**CHAT_OK, **patch}), status, code)
    t.join(120)
    events = result["events"]
    assert events[-1] == "[DONE]"
    ids = sum((e["choices"][0]["token_ids"] for e in events[:-1]), [])
    assert ids == expected(reference, prompt, "a0", 60, ignore_eos=True).token_ids


def test_limited_server_bounds(limited_server):
    http = httpx.Client(base_url=limited_server.url, timeout=120)
    ok = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2}
    r = http.post("/v1/completions", json=ok)  # no API key configured: open; model = folder name
    assert r.status_code == 200, r.text
    assert_error(http.post("/v1/completions", json={**ok, "max_tokens": LIMITED["max_tokens_limit"] + 1}),
                 400)
    # More choices than max_pending can never be admitted: a 400 naming n, not a 429 that invites retries.
    err = assert_error(http.post("/v1/completions", json={**ok, "n": LIMITED["max_pending"] + 1}), 400)
    assert err["param"] == "n" and "--max-pending" in err["message"], err
    client = openai.OpenAI(base_url=limited_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[5, 6], max_tokens=2, n=LIMITED["max_pending"] + 1)
    # Body size bound, declared or streamed in chunks.
    big = {**ok, "prompt": "x" * (LIMITED["max_body_bytes"] + 1)}
    assert_error(http.post("/v1/completions", json=big), 413)

    def chunks():
        for _ in range(LIMITED["max_body_bytes"] // 1000 + 2):
            yield b" " * 1000
    assert_error(http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
                 413)
    # Runtime adapter loading is off without --adapter-root.
    assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a0"}), 403,
                 "adapter_loading_disabled")
    assert http.post("/v1/completions", json=ok).status_code == 200
