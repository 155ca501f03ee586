"""Bounded fuzzing of the HTTP schema: request bodies drawn from the server's own OpenAPI document (mostly
conforming, sometimes wrong-typed, sometimes out of range) never get a 5xx, every refusal is an OpenAI error
object, every success is well formed, and the server keeps answering exactly afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.support import LIMITED, assert_error, expected

MAX_EXAMPLES = 120
ALLOWED = {200, 400, 403, 404, 413, 429}

ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(-2, 2) | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                    max_size=3),
                        max_leaves=6)


def from_schema(schema: dict, components: dict, prop: str = "") -> st.SearchStrategy:
    """Any value the JSON schema allows (kept small: short strings and arrays, integers near the bounds)."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[-1]], components, prop)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components, prop) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        lo = -3 if lo is None else max(int(lo), -(2**63))
        hi = 300 if hi is None else min(int(hi), 300)
        return st.integers(lo - 1, hi + 1)  # one past each bound as well
    if kind == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -2.0))
        hi = min(schema.get("maximum", 2.0), 4.0)
        return st.floats(float(lo) - 0.5, float(hi) + 0.5, allow_nan=False)
    if kind == "string":
        return st.text(max_size=12)
    if kind == "array":
        items = from_schema(schema.get("items", {}), components, prop)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if not props:
            return st.dictionaries(st.text(max_size=4), st.floats(-2, 2), max_size=2)
        required = set(schema.get("required", ()))
        fields = {name: from_schema(sub, components, name) for name, sub in props.items()}
        return st.fixed_dictionaries({k: v for k, v in fields.items() if k in required},
                                     optional={k: v for k, v in fields.items() if k not in required})
    return ANY_JSON


def _int_in(schema: dict) -> bool:
    return schema.get("type") == "integer" or any(s.get("type") == "integer" for s in schema.get("anyOf", ()))


TOKENS = st.lists(st.integers(0, 255), min_size=1, max_size=8)
TEXT = st.text(min_size=1, max_size=12)
# Values a working client sends, for the fields where most of the schema's range is refused on purpose
# (unsupported options accepted only at their neutral value) or fails later (token ids past the vocabulary).
LIKELY = {
    "model": st.sampled_from(["tiny", "a0"]),
    "prompt": st.one_of(TEXT, TOKENS, st.lists(TOKENS, min_size=1, max_size=2), st.lists(TEXT, min_size=1, max_size=2)),
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]),
         "content": st.one_of(st.text(max_size=6), st.lists(st.fixed_dictionaries(
             {"type": st.just("text"), "text": st.text(max_size=4)}), max_size=2))}), min_size=1, max_size=2),
    "max_tokens": st.none() | st.integers(1, LIMITED["max_tokens_limit"]),
    "max_completion_tokens": st.none() | st.integers(1, LIMITED["max_tokens_limit"]),
    "n": st.none() | st.integers(1, 2),
    "best_of": st.none(),
    "temperature": st.none() | st.floats(0, 2),
    "top_p": st.none() | st.floats(0.05, 1),
    "top_k": st.none() | st.integers(-1, 300),
    "presence_penalty": st.none() | st.just(0.0),
    "frequency_penalty": st.none() | st.just(0.0),
    "logit_bias": st.none() | st.just({}),
    "echo": st.none() | st.just(False),
    "suffix": st.none(),
    "tools": st.none() | st.just([]),
    "response_format": st.none() | st.just({"type": "text"}),
    "top_logprobs": st.none() | st.just(0),
    "stop": st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "stop_token_ids": st.none() | st.lists(st.integers(0, 255), max_size=3),
    "lora_name": st.text(max_size=8),
    "lora_path": st.sampled_from(["a0", "../x", "/etc", "nested"]) | st.text(max_size=8),
}


def body_strategy(schema: dict, components: dict) -> st.SearchStrategy:
    """Mostly-valid bodies (the schema's fields, LIKELY values where given), the same with one field replaced
    by anything the schema allows or any JSON at all, and arbitrary JSON."""
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    props, required = schema["properties"], set(schema.get("required", ()))

    def likely(name):
        if name == "logprobs":  # completions: an int (only 0 is served); chat: a bool
            return st.none() | (st.just(0) if _int_in(props[name]) else st.booleans())
        return LIKELY.get(name, from_schema(props[name], components, name))

    valid = st.fixed_dictionaries({k: likely(k) for k in props if k in required},
                                  optional={k: likely(k) for k in props if k not in required})

    def mutate(body):
        name = st.sampled_from(sorted(props))
        return name.flatmap(lambda k: st.one_of(from_schema(props[k], components, k), ANY_JSON, st.just(_DROP)).map(
            lambda v: {**{f: x for f, x in body.items() if f != k}, **({} if v is _DROP else {k: v})}))

    return st.one_of(valid, valid.flatmap(mutate), ANY_JSON)


_DROP = object()


@pytest.fixture(scope="module")
def openapi(limited_server):
    doc = httpx.get(limited_server.url + "/openapi.json").json()
    return doc


def _body_schema(doc: dict, path: str) -> dict:
    return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def _check(resp: httpx.Response, body) -> None:
    assert resp.status_code in ALLOWED, (resp.status_code, resp.text, body)
    if resp.status_code != 200:
        assert_error(resp, resp.status_code)
        return
    if isinstance(body, dict) and body.get("stream"):
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.text.split("\n") if ln]
        assert lines[-1] == "data: [DONE]", resp.text
        for ln in lines[:-1]:
            event = json.loads(ln[len("data: "):])
            if "error" in event:  # a failure after the stream started is reported in-band
                raise AssertionError(event)
        return
    out = resp.json()
    assert out["choices"] and all(c["finish_reason"] in ("stop", "length") for c in out["choices"])
    assert [c["index"] for c in out["choices"]] == list(range(len(out["choices"])))
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    assert out["usage"]["completion_tokens"] <= LIMITED["max_tokens_limit"] * len(out["choices"])


FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                                  "/v1/unload_lora_adapter"])
@pytest.mark.slow
def test_fuzz_request_schema(limited_server, openapi, path):
    strategy = body_strategy(_body_schema(openapi, path), openapi["components"]["schemas"])
    with httpx.Client(base_url=limited_server.url, timeout=60) as http:

        @FUZZ
        @given(body=strategy)
        def run(body):
            _check(http.post(path, json=body), body)

        run()


def test_server_exact_after_fuzzing(limited_server, openapi, reference):
    """Runs after the fuzz tests (file order): health, and an exact answer."""
    assert httpx.get(limited_server.url + "/health").status_code == 200
    prompt = [7, 8, 9, 10]
    r = httpx.post(limited_server.url + "/v1/completions",
                   json=dict(model="a0", prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True,
                             return_token_ids=True)).json()
    assert r["choices"][0]["token_ids"] == expected(reference, prompt, "a0", 8, ignore_eos=True).token_ids
