"""Hostile or careless input to the main server: adapter configs that would stall or break it, huge texts,
names and paths that must not leak or inject anything. Each answer is a clear 4xx, quickly, and the server
keeps serving (the same connection included)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

import slora_jax as sj
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter
from slora_jax.server.app import create_app
from tests.server.support import ENGINE_CONFIG, MODEL, assert_error, expected, serving, token_prompts


def _adapter(files, name: str, **config) -> str:
    """A valid adapter under the root, with ``config`` written over its adapter_config.json."""
    d = write_random_adapter(files["adapter_root"] / "hostile" / name, tiny_llama_config(), rank=4, alpha=8,
                             target_modules=("q_proj", "v_proj"), seed=5, init_scale=0.3)
    path = d / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return f"hostile/{name}"


def _models(http) -> dict:
    return {m["id"]: m for m in http.get("/v1/models").json()["data"]}


def _health_during(http, fn):
    """Run ``fn`` on a thread while /health is polled; returns (fn's result, slowest /health seconds)."""
    out, slowest = {}, 0.0
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    while t.is_alive():
        t0 = time.perf_counter()
        assert http.get("/health", timeout=30).status_code == 200
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.05)
    t.join()
    return out["r"], slowest


@pytest.mark.parametrize("field, value", [
    ("target_modules", "(.*)*(.*)*(.*)*z"),
    ("target_modules", ".*" * 8 + "z"),
    ("exclude_modules", "(.*)*(.*)*(.*)*z"),
    ("rank_pattern", {"(.*)*(.*)*(.*)*z": 2}),
    ("alpha_pattern", {"(.*)*(.*)*(.*)*z": 2}),
    ("layers_pattern", "(.*)*(.*)*(.*)*z"),
])
def test_catastrophic_regexes_do_not_stall_the_server(http, files, field, value):
    extra = {"layers_to_transform": [0]} if field == "layers_pattern" else {}
    path = _adapter(files, f"regex_{field}_{len(str(value))}", **{field: value}, **extra)
    client = httpx.Client(base_url=str(http.base_url), headers=http.headers, timeout=20)
    t0 = time.perf_counter()
    r, slowest = _health_during(client, lambda: client.post("/v1/load_lora_adapter",
                                                            json={"lora_name": "hostile", "lora_path": path}))
    assert time.perf_counter() - t0 < 10 and slowest < 2.0
    if r.status_code == 200:  # the pattern matched nothing harmful: the adapter loaded; unload it again
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "hostile"}).status_code == 200
    else:
        err = assert_error(r, 400)
        assert "matches none of the projections" in err["message"], err


def test_patterns_re2_refuses_are_a_400_naming_them(http, files):
    path = _adapter(files, "backref", target_modules=r"(q)_proj\1")
    err = assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "backref", "lora_path": path}), 400)
    assert "target_modules" in err["message"] and r"(q)_proj\\1" in err["message"], err
    assert "backref" not in _models(http)


def test_deeply_nested_config_is_a_400_and_the_connection_stays_usable(http, files):
    path = _adapter(files, "nested")
    (files["adapter_root"] / path / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with httpx.Client(base_url=str(http.base_url), headers=http.headers, timeout=60) as one:
        err = assert_error(one.post("/v1/load_lora_adapter", json={"lora_name": "nested", "lora_path": path}), 400)
        assert "nested too deeply" in err["message"], err
        # A deeply nested request body too.
        r = one.post("/v1/completions", content=b"[" * 100_000 + b"]" * 100_000,
                     headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert one.get("/v1/models").status_code == 200  # same client, same kept-alive connection


@pytest.mark.parametrize("config, shown", [
    ({"lora_alpha": 1e30}, "1e+30"),
    ({"alpha_pattern": {"v_proj": 1e30}}, "1e+30"),
])
def test_overflowing_scale_is_a_400_naming_the_value(http, files, config, shown):
    path = _adapter(files, f"scale{len(config)}{shown}", **config)
    err = assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "bigscale", "lora_path": path}), 400)
    assert shown in err["message"] and "scale" in err["message"], err
    assert "bigscale" not in _models(http)


def test_a_scale_that_overflows_float16_is_a_400_on_a_float16_engine(http, files):
    """alpha 4e5 / r 4 = 1e5: past float16's largest value (65504), well inside float32's bound."""
    path = _adapter(files, "f16scale", lora_alpha=4e5)
    ok = http.post("/v1/load_lora_adapter", json={"lora_name": "f16scale", "lora_path": path})
    assert ok.status_code == 200, ok.text  # the main server runs in float32
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "f16scale"}).status_code == 200
    engine = sj.Engine.from_pretrained(files["model"], config=sj.EngineConfig(**{**ENGINE_CONFIG, "dtype": "float16"}))
    with serving(create_app(engine, served_model_name=MODEL, adapter_root=str(files["adapter_root"]))) as url:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "f16scale", "lora_path": path}, timeout=60)
        err = assert_error(r, 400)
        assert "1e+05" in err["message"] and "400000.0" in err["message"], err
        assert "float16" in err["message"] and "6.55e+04" in err["message"], err
        names = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
        assert "f16scale" not in names


def test_over_long_text_is_refused_before_tokenizing(http):
    """The byte tokenizer's tokens are one character: more characters than the context cannot fit."""
    huge = "x" * 3_900_000
    client = httpx.Client(base_url=str(http.base_url), headers=http.headers, timeout=60)
    r, slowest = _health_during(client, lambda: client.post(
        "/v1/completions", json={"model": MODEL, "prompt": huge, "max_tokens": 2}))
    err = assert_error(r, 400)
    assert "3900000 characters" in err["message"] and err["param"] == "prompt", err
    assert slowest < 2.0
    err = assert_error(http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": huge[:100_000]}]}), 400)
    assert "characters" in err["message"] and err["param"] == "messages", err


def test_paths_outside_the_root_get_one_answer_whether_or_not_they_exist(http, files):
    outside = files["outside"]
    answers = []
    for path in (str(outside), str(outside.parent / "no-such-folder"), str(outside / "missing" / "deeper"),
                 "/etc", "/no/such/path"):
        err = assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}), 403)
        answers.append((err["code"], err["message"].replace(repr(path), "PATH")))
    assert len(set(answers)) == 1, answers


@pytest.mark.parametrize("name", ["a\x00b", "line\nbreak", 'quo"te', "sl/ash", "rtl\u202egnp", "-dash-first",
                                  "x" * 129, " spaced", "ünïcode"])
def test_unsafe_adapter_names_are_refused(http, name):
    err = assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "a0"}), 400)
    assert err["param"] == "lora_name" and "letters, digits" in err["message"], err
    assert name not in _models(http)


def test_paths_shown_to_clients_are_relative_to_the_root(http, files):
    root = str(files["adapter_root"])
    models = http.get("/v1/models").text
    assert root not in models and str(files["model"]) not in models
    cards = _models(http)
    assert cards["a0"]["root"] == "a0" and cards[MODEL]["root"] == files["model"].name
    # An error about a file under the root names it relative to the root.
    path = _adapter(files, "badjson")
    (files["adapter_root"] / path / "adapter_config.json").write_text("{oops")
    err = assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "badjson", "lora_path": path}), 400)
    assert root not in err["message"] and f"{path}/adapter_config.json" in err["message"], err
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "shown", "lora_path": "nested/late"})
    assert r.status_code == 200 and r.json()["adapter"]["path"] == "nested/late", r.text
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "shown"}).status_code == 200


@pytest.mark.slow  # three 200-token streams, ~6 s on two cores with an empty compilation cache
def test_unload_with_drain_under_traffic(http, reference, files):
    """Streams on an adapter run; unload with drain: new requests get 404 at once, the streams finish
    exactly, then the adapter is gone. Without drain the same unload is refused."""
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "busy", "lora_path": "nested/late"})
    assert r.status_code == 200, r.text
    prompts = token_prompts(3, seed=81)
    results, started = {}, [threading.Event() for _ in prompts]

    def stream(i, prompt):
        body = dict(model="busy", prompt=prompt, max_tokens=200, temperature=0, stream=True, ignore_eos=True,
                    return_token_ids=True)
        ids, last = [], None
        with http.stream("POST", "/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                started[i].set()
                if line == "data: [DONE]":
                    break
                last = json.loads(line[len("data: "):])
                ids += last["choices"][0].get("token_ids") or []
        results[i] = (ids, last)

    threads = [threading.Thread(target=stream, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(120)
    assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "busy"}), 400)  # in use, no drain
    unload = {}
    drainer = threading.Thread(target=lambda: unload.setdefault("r", http.post(
        "/v1/unload_lora_adapter", json={"lora_name": "busy", "drain": True, "drain_timeout": 120})))
    drainer.start()
    refused = None
    deadline = time.monotonic() + 60
    while refused is None and time.monotonic() < deadline:
        r = http.post("/v1/completions", json={"model": "busy", "prompt": [5, 6], "max_tokens": 1})
        if r.status_code == 404:
            refused = r
    drainer.join(180)
    for t in threads:
        t.join(180)
    assert refused is not None and "being unloaded" in refused.json()["error"]["message"]
    assert unload["r"].status_code == 200, unload["r"].text
    assert "busy" not in _models(http)
    for i, prompt in enumerate(prompts):
        ids, last = results[i]
        assert last["choices"][0]["finish_reason"] == "length"
        assert ids == expected(reference, prompt, "late", 200, ignore_eos=True).token_ids


@pytest.mark.slow  # a 240-token stream, ~10 s cold on two cores
def test_unload_drain_timeout_keeps_the_adapter(http):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "slowdrain", "lora_path": "nested/late"})
    assert r.status_code == 200, r.text
    body = dict(model="slowdrain", prompt=[5, 6, 7], max_tokens=240, stream=True, ignore_eos=True)
    with http.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        err = assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "slowdrain", "drain": True,
                                                                       "drain_timeout": 0}), 400)
        assert "serves again" in err["message"], err
        lines = [line for line in lines if line]
    assert lines[-1] == "data: [DONE]"
    assert "slowdrain" in _models(http)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "slowdrain", "drain": True}).status_code == 200
