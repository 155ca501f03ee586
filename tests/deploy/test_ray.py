"""slora-jax on Ray Serve (slora_jax.deploy.ray): two replicas of a tiny model with four adapters, real clients
(httpx, the openai package) against the port given to ``serve``, where Serve's HTTP proxy answers (the
default; test_ray_direct.py covers direct ingress); every answer checked against one in-process engine.

The tests share one app and run in file order; the replica-killing test comes last."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import queue
import time

import httpx
import pytest

from tests.deploy.conftest import ADAPTERS, API_KEY, LATE, MODEL, REPLICAS, listener
from tests.server.support import assert_error, expected, token_prompts

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
BURST_TOKENS = 48  # long enough that the kill finds requests in flight
# A Ray instance and two engine replicas take ~20 s to start on two cores: the whole module is in the full
# suite, not the quick subset (test_fleet.py keeps a Ray start there).
pytestmark = [pytest.mark.slow] + ([pytest.mark.timeout(300)] if hasattr(pytest.mark, "timeout") else [])


def complete(url, model, prompt, max_tokens=6, timeout=120, **extra):
    return httpx.post(url + "/v1/completions", headers=HEADERS, timeout=timeout,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "return_token_ids": True, **extra})


def replica_of(resp) -> str:
    rid = resp.headers.get("x-slora-replica")
    assert rid, dict(resp.headers)
    return rid


def models(url) -> dict:
    r = httpx.get(url + "/v1/models", headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    return {card["id"]: card for card in r.json()["data"]}


def test_greedy_answers_equal_one_engine(ray_app, ray_reference):
    for i, prompt in enumerate(token_prompts(8, seed=5)):
        model = MODEL if i % 4 == 0 else list(ADAPTERS)[i % len(ADAPTERS)]
        r = complete(ray_app, model, prompt)
        assert r.status_code == 200, r.text
        replica_of(r)
        want = expected(ray_reference, prompt, None if model == MODEL else model, 6, temperature=0.0)
        assert r.json()["choices"][0]["token_ids"] == want.token_ids, (model, i)


def test_the_port_is_serves_proxy(ray_serve):
    port = httpx.URL(ray_serve.url).port
    assert "ProxyActor" in listener(port), listener(port)
    assert not any("Serve's HTTP proxy" in line for line in ray_serve.lines), ray_serve.log()
    r = complete(ray_serve.url, "a0", [1, 2, 3], max_tokens=2)
    assert r.status_code == 200, r.text
    replica_of(r)
    assert "replica;dur=" in r.headers["server-timing"], dict(r.headers)


def test_streams_through_the_openai_client_equal_one_engine(ray_app, ray_reference):
    import openai

    client = openai.OpenAI(base_url=ray_app + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    prompt = "hello ray"
    for model in ("a1", MODEL):
        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                                stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        want = ray_reference.generate([prompt], adapters=[None if model == MODEL else model],
                                      sampling=__import__("slora_jax").SamplingParams(max_tokens=8))[0]
        assert text == want.text, model
    chat = client.chat.completions.create(model="a2", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4


def test_each_adapter_sticks_to_one_replica_and_both_serve(ray_app):
    prompt = [5, 6, 7]
    homes = {}
    for name in ADAPTERS:  # one at a time: the router learns where each went before the next arrives
        homes[name] = replica_of(complete(ray_app, name, prompt, max_tokens=1))
        time.sleep(1.0)
    seen = collections.defaultdict(set)
    for _ in range(3):
        for name in ADAPTERS:
            r = complete(ray_app, name, prompt, max_tokens=1)
            assert r.status_code == 200, r.text
            seen[name].add(replica_of(r))
    assert all(seen[name] == {homes[name]} for name in ADAPTERS), (homes, dict(seen))
    assert len(set(homes.values())) == REPLICAS, homes


def test_models_list_the_union_with_each_replica(ray_app):
    deadline = time.monotonic() + 30  # replicas report to the catalog every second
    while True:
        cards = models(ray_app)
        if all(len(cards[n].get("replicas", {})) == REPLICAS for n in (MODEL, *ADAPTERS)) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(cards) == {MODEL, *ADAPTERS}, set(cards)
    for name in (MODEL, *ADAPTERS):
        assert len(cards[name]["replicas"]) == REPLICAS, cards[name]
        assert set(cards[name]["replicas"].values()) <= {"device", "host", "disk"}, cards[name]


def test_metrics_carry_a_replica_label(ray_app):
    for name in ADAPTERS:
        assert complete(ray_app, name, [9, 9, 9], max_tokens=1).status_code == 200
    time.sleep(1.5)  # the other replica's numbers arrive with its next report
    r = httpx.get(ray_app + "/metrics", timeout=60)
    assert r.status_code == 200, r.text
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    served = [s for s in fams["slora_requests"].samples if s.name == "slora_requests_total"]
    assert {s.labels["replica"] for s in served} == {s.labels["replica"] for s in fams["slora_engine_up"].samples}
    assert len({s.labels["replica"] for s in fams["slora_engine_up"].samples}) == REPLICAS
    by_adapter = {s.labels["model"] for s in served if s.value > 0}
    assert set(ADAPTERS) <= by_adapter, by_adapter
    resident = {(s.labels["adapter"], s.labels["replica"]) for s in fams["slora_adapter_resident"].samples}
    assert {a for a, _ in resident} == set(ADAPTERS), resident


def test_errors_are_openai_errors_from_a_replica(ray_app):
    r = complete(ray_app, "no-such-adapter", [1, 2])
    assert_error(r, 404, "model_not_found")
    replica_of(r)
    assert_error(httpx.post(ray_app + "/v1/completions", json={"model": MODEL, "prompt": [1]}, timeout=30), 401)
    assert_error(complete(ray_app, MODEL, [1, 2], max_tokens=-3), 400)
    bad = httpx.post(ray_app + "/v1/completions", headers=HEADERS, content=b"{not json", timeout=30)
    assert_error(bad, 400)


def test_load_and_unload_reach_both_replicas(ray_app, ray_reference):
    r = httpx.post(ray_app + "/v1/load_lora_adapter", headers=HEADERS, timeout=120,
                   json={"lora_name": LATE, "lora_path": LATE})
    assert r.status_code == 200, r.text
    reached = r.json()["replicas"]
    assert len(reached) == REPLICAS and set(reached.values()) == {"ok"}, reached
    assert len(models(ray_app)[LATE]["replicas"]) == REPLICAS
    prompt = [11, 12, 13, 14]
    got = complete(ray_app, LATE, prompt)
    assert got.status_code == 200, got.text
    assert got.json()["choices"][0]["token_ids"] == expected(ray_reference, prompt, LATE, 6, temperature=0.0).token_ids

    outside = httpx.post(ray_app + "/v1/load_lora_adapter", headers=HEADERS, timeout=60,
                         json={"lora_name": "x", "lora_path": "/etc"})
    assert outside.status_code in (400, 403), outside.text  # the serve app's own path check, on a replica

    r = httpx.post(ray_app + "/v1/unload_lora_adapter", headers=HEADERS, timeout=120, json={"lora_name": LATE})
    assert r.status_code == 200, r.text
    reached = r.json()["replicas"]
    assert len(reached) == REPLICAS and set(reached.values()) == {"ok"}, reached
    assert LATE not in models(ray_app)
    # Both replicas dropped it: no replica serves it, whichever the router picks.
    for _ in range(2 * REPLICAS):
        assert_error(complete(ray_app, LATE, prompt), 404, "model_not_found")


def _one(url, model, prompt, stream, started: queue.Queue):
    """One request of the burst -> (outcome, value, retried): ('ok', tokens) | ('error', OpenAI error) |
    ('lost', what happened); ``retried``: the replicas that died under it before one answered. A stream
    puts its replica on ``started`` once its first event arrived."""
    body = {"model": model, "prompt": prompt, "max_tokens": BURST_TOKENS, "temperature": 0, "stream": stream,
            "return_token_ids": True}
    try:
        if not stream:
            r = httpx.post(url + "/v1/completions", headers=HEADERS, json=body, timeout=180)
            retried = int(r.headers.get("x-slora-retried", 0))
            if r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop"):
                return "ok", r.json()["choices"][0]["token_ids"], retried
            return ("error", r.json()["error"], retried) if "error" in r.json() else ("lost", r.text, retried)
        tokens, events = [], []
        with httpx.stream("POST", url + "/v1/completions", headers=HEADERS, json=body, timeout=180) as r:
            retried = int(r.headers.get("x-slora-retried", 0))
            if r.status_code != 200:
                return "error", json.loads(r.read())["error"], retried
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        started.put(r.headers["x-slora-replica"])
        if events[-1] != "[DONE]":
            return "lost", events, retried
        last = json.loads(events[-2])
        if "error" in last:
            return "error", last["error"], retried
        for e in events[:-1]:
            tokens += json.loads(e)["choices"][0].get("token_ids") or []
        done = last["choices"][0]["finish_reason"] in ("length", "stop")
        return ("ok" if done else "lost"), (tokens if done else events), retried
    except Exception as e:  # a cut connection, a timeout: the request went unanswered
        return "lost", repr(e), 0


@pytest.mark.slow
def test_a_replica_killed_during_a_burst_leaves_no_request_unanswered(ray_app, ray_app_cluster, ray_reference):
    import ray
    from ray import serve

    from slora_jax.deploy.ray import APP_NAME

    replicas = {a["name"].rsplit("#", 1)[1]: a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA") and "#SloraEngine#" in a["name"]}
    assert len(replicas) == REPLICAS, replicas
    prompts = token_prompts(24, seed=9)
    jobs = [(list(ADAPTERS)[i % len(ADAPTERS)] if i % 5 else MODEL, p, i % 2 == 0) for i, p in enumerate(prompts)]
    started: queue.Queue = queue.Queue()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_one, ray_app, *job, started) for job in jobs]
        victim = started.get(timeout=120)  # a replica with a stream under way: the burst is in flight there
        ray.kill(ray.get_actor(replicas[victim], namespace="serve"), no_restart=True)
        outcomes = [f.result(timeout=240) for f in futures]
    lost = [(job, o) for job, o in zip(jobs, outcomes) if o[0] == "lost"]
    assert not lost, lost
    # The kill hit requests in flight: some were retried on the other replica or ended with an error.
    hit = sum(1 for kind, _, retried in outcomes if kind == "error" or retried)
    assert hit > 0, outcomes
    for (model, prompt, _), (kind, value, _) in zip(jobs, outcomes):
        if kind == "ok":  # an answer that was retried elsewhere is still the right one
            want = expected(ray_reference, prompt, None if model == MODEL else model, BURST_TOKENS, temperature=0.0)
            assert value == want.token_ids, model
        else:
            assert value["message"] and value["type"] and value["code"], value
    assert sum(kind == "ok" for kind, *_ in outcomes) >= len(jobs) // 2, outcomes

    deadline = time.monotonic() + 200  # Serve starts a replacement, which takes the catalog's adapters
    while True:
        status = serve.status().applications[APP_NAME].deployments["SloraEngine"]
        if status.replica_states.get("RUNNING", 0) == REPLICAS:
            break
        assert time.monotonic() < deadline, status
        time.sleep(1.0)
    for name in ADAPTERS:
        assert complete(ray_app, name, [3, 4, 5], max_tokens=2).status_code == 200

