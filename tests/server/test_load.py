"""Load and disconnects: 64 concurrent streaming clients over mixed adapters, some leaving mid-stream; every
finished answer exact, none lost, the pool back to zero KV pages. Metrics parse and add up."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import slora_jax as sj
from tests.server.support import API_KEY, MODEL, START_ADAPTERS, adapter_of, token_prompts

CLIENTS = 64
LEAVERS = 16  # clients that disconnect after their second chunk
MAX_TOKENS = 12
LONG = 200  # leavers ask for many tokens, so they are surely unfinished when they leave


def scrape(url: str) -> dict:
    """(name, frozenset(labels)) -> value for every sample of /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def wait_idle(url: str, timeout: float = 60.0) -> dict:
    """Scrape until nothing runs, waits or holds KV pages."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        fresh = value(m, "slora_engine_stats_age_seconds") < 1.0  # not a copy from before a long step
        if fresh and (value(m, "slora_requests_running"), value(m, "slora_requests_waiting"),
                      value(m, "slora_pool_kv_pages")) == (0, 0, 0):
            return m
        assert time.monotonic() < deadline, {k: v for k, v in m.items() if "pool" in k[0] or "requests_" in k[0]}
        time.sleep(0.1)


async def _client(http: httpx.AsyncClient, model: str, prompt: list[int], leave: bool):
    body = dict(model=model, prompt=prompt, max_tokens=LONG if leave else MAX_TOKENS, temperature=0, stream=True,
                ignore_eos=True, return_token_ids=True)
    ids, chunks, finish = [], 0, None
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return ids, finish, True
            choice = json.loads(line[6:])["choices"][0]
            ids += choice["token_ids"]
            finish = choice["finish_reason"] or finish
            chunks += 1
            if leave and chunks == 2:
                return ids, finish, False  # leaving the block closes the connection mid-stream
    return ids, finish, False


async def _run_clients(url: str, jobs):
    limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                                 limits=limits) as http:
        return await asyncio.gather(*(_client(http, m, p, leave) for m, p, leave in jobs))


@pytest.mark.slow
def test_64_concurrent_streams_with_disconnects(server, reference):
    models = [MODEL, *START_ADAPTERS]
    prompts = token_prompts(CLIENTS, seed=81)
    jobs = [(models[i % len(models)], prompts[i], i % (CLIENTS // LEAVERS) == 0) for i in range(CLIENTS)]
    stayers = [(m, p) for m, p, leave in jobs if not leave]
    want = reference.generate([p for _, p in stayers], adapters=[adapter_of(m) for m, _ in stayers],
                              sampling=sj.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    before = wait_idle(server.url)

    results = asyncio.run(_run_clients(server.url, jobs))

    answers = iter(want)
    for (model, prompt, leave), (ids, finish, done) in zip(jobs, results):
        if leave:
            assert not done and finish is None
            continue
        w = next(answers)
        assert done and finish == "length", (model, ids)
        assert ids == w.token_ids, model
    after = wait_idle(server.url)
    assert value(after, "slora_pool_kv_pages") == 0
    # No request lost: every stayer finished with 'length', every leaver was counted as a disconnect and
    # aborted in the engine.
    finished = sum(value(after, "slora_requests_total", model=m, finish_reason="length")
                   - value(before, "slora_requests_total", model=m, finish_reason="length") for m in models)
    left = sum(value(after, "slora_requests_total", model=m, finish_reason="disconnect")
               - value(before, "slora_requests_total", model=m, finish_reason="disconnect") for m in models)
    assert (finished, left) == (CLIENTS - LEAVERS, LEAVERS)
    assert value(after, "slora_engine_aborted_requests_total") - value(before, "slora_engine_aborted_requests_total") \
        == LEAVERS
    gen = value(after, "slora_engine_generated_tokens_total") - value(before, "slora_engine_generated_tokens_total")
    assert (CLIENTS - LEAVERS) * MAX_TOKENS + 2 * LEAVERS <= gen < (CLIENTS - LEAVERS) * MAX_TOKENS + LEAVERS * LONG


def test_non_streaming_client_that_leaves_is_aborted(server):
    before = wait_idle(server.url)
    # 16 x 240 tokens take at least 240 decode steps (~0.3 s on the CPU once compiled): the client, gone
    # after 0.1 s, leaves while they run.
    body = dict(model="a1", prompt=[5, 6, 7], n=16, max_tokens=240, temperature=0, ignore_eos=True)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        try:
            http.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.1))
            raise AssertionError("the request finished before the client left; make it longer")
        except httpx.ReadTimeout:
            pass
    # The handler may still be admitting the request when the client is gone; wait for its aborts to show.
    deadline = time.monotonic() + 60
    while True:
        after = wait_idle(server.url)
        aborted = value(after, "slora_engine_aborted_requests_total") \
            - value(before, "slora_engine_aborted_requests_total")
        if aborted >= 16 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert aborted == 16
    assert value(after, "slora_requests_total", model="a1", finish_reason="disconnect") \
        - value(before, "slora_requests_total", model="a1", finish_reason="disconnect") == 16


def test_metrics_parse_and_describe_the_engine(server, http, reference):
    prompt = token_prompts(1, seed=91)[0]
    before = scrape(server.url)
    r = http.post("/v1/completions", json=dict(model="a2", prompt=prompt, max_tokens=5, temperature=0,
                                               ignore_eos=True))
    assert r.status_code == 200
    http.post("/v1/completions", json=dict(model="nope", prompt=prompt, max_tokens=5))
    # Engine gauges come from the snapshot the engine thread publishes when it pauses (or every second).
    deadline = time.monotonic() + 10
    while True:
        m = scrape(server.url)
        if value(m, "slora_adapter_resident", adapter="a2") == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert value(m, "slora_engine_stats_age_seconds") < 10
    assert value(m, "slora_requests_total", model="a2", finish_reason="length") \
        - value(before, "slora_requests_total", model="a2", finish_reason="length") == 1
    assert value(m, "slora_generation_tokens_total", model="a2") \
        - value(before, "slora_generation_tokens_total", model="a2") == 5
    assert value(m, "slora_prompt_tokens_total", model="a2") \
        - value(before, "slora_prompt_tokens_total", model="a2") == len(prompt)
    assert value(m, "slora_http_errors_total", status="404") - value(before, "slora_http_errors_total", status="404") \
        == 1
    assert value(m, "slora_time_to_first_token_seconds_count") >= 1
    assert value(m, "slora_e2e_request_latency_seconds_count") >= 1
    assert value(m, "slora_engine_up") == 1
    total = reference.stats()["total_pages"]  # same configuration, same pool
    assert value(m, "slora_pool_total_pages") == total
    assert value(m, "slora_pool_free_pages") + value(m, "slora_pool_kv_pages") + value(m, "slora_pool_adapter_pages") \
        == total
    # a2 just ran, so its weights are on the device; residency, location and page gauges agree.
    assert value(m, "slora_adapter_resident", adapter="a2") == 1
    assert value(m, "slora_adapter_location", adapter="a2", location="device") == 1
    assert value(m, "slora_adapter_device_pages", adapter="a2") > 0
    resident = sum(v for (name, _), v in m.items() if name == "slora_adapter_resident")
    assert resident == value(m, "slora_adapters_on_device")
    assert value(m, "slora_adapter_loads_total") >= 1
    assert value(m, "slora_engine_steps_total") > 0
