"""slora-jax on Ray Serve (slora_jax.deploy.ray): two replicas of a tiny model, real clients against the
real HTTP proxy, every answer checked against one in-process engine."""

from __future__ import annotations

import httpx
import pytest

from tests.deploy.conftest import ADAPTERS, API_KEY, MODEL
from tests.server.support import expected, token_prompts

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def complete(url, model, prompt, max_tokens=6, **extra):
    r = httpx.post(url + "/v1/completions", headers=HEADERS, timeout=120,
                   json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                         "return_token_ids": True, **extra})
    return r


def test_greedy_answers_equal_one_engine(ray_app, ray_reference):
    prompts = token_prompts(6, seed=5)
    for i, prompt in enumerate(prompts):
        model = list(ADAPTERS)[i % len(ADAPTERS)] if i % 3 else MODEL
        r = complete(ray_app, model, prompt)
        assert r.status_code == 200, r.text
        assert r.headers.get("x-slora-replica"), r.headers
        want = expected(ray_reference, prompt, None if model == MODEL else model, 6, temperature=0.0)
        assert r.json()["choices"][0]["token_ids"] == want.token_ids, (model, i)
