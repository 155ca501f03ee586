"""What must never wait for the engine thread or a slow tokenizer: probes, scrapes and other connections.
The app runs in this process (uvicorn on a thread) so that a test can hold the engine thread or slow the
tokenizer down at will, which a server process gives no handle on."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

import slora_jax as sj
from slora_jax.server.app import create_app
from slora_jax.server.lifecycle import Lifecycle
from tests.server.support import ENGINE_CONFIG, serving


def hold_engine_thread(app, seconds: float) -> threading.Thread:
    """Occupy the engine thread for ``seconds`` (as a long step or a compilation would)."""
    loop = app.state.server.loop
    thread = threading.Thread(target=lambda: asyncio.run(loop.call(lambda: time.sleep(seconds))), daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def engine(files):
    return sj.Engine.from_pretrained(files["model"], config=sj.EngineConfig(**ENGINE_CONFIG))


def timed_get(url: str) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = httpx.get(url, timeout=30)
    return r, time.perf_counter() - t0


@pytest.mark.slow  # holds the engine thread 3 s
def test_metrics_never_wait_for_the_engine_thread(engine):
    app = create_app(engine, served_model_name="tiny")
    with serving(app) as url:
        assert httpx.get(url + "/metrics").status_code == 200
        held = hold_engine_thread(app, 3.0)
        time.sleep(0.3)
        for _ in range(5):
            r, seconds = timed_get(url + "/metrics")
            assert r.status_code == 200 and seconds < 1.0, seconds
            assert "slora_engine_up 1.0" in r.text and "slora_pool_total_pages" in r.text
        held.join()


@pytest.mark.slow  # holds the engine thread 4 s
def test_liveness_follows_engine_progress(engine):
    """/live and /health turn 503 'stalled' while the engine thread is stuck past --stall-timeout, and
    come back when it moves again."""
    app = create_app(engine, served_model_name="tiny", lifecycle=Lifecycle(stall_timeout_s=1.0))
    with serving(app) as url:
        for path in ("/live", "/ready", "/health"):
            assert httpx.get(url + path).json() == {"status": "ok"}
        held = hold_engine_thread(app, 4.0)
        time.sleep(2.0)
        for path in ("/live", "/ready", "/health"):
            r, seconds = timed_get(url + path)
            assert r.status_code == 503 and r.json()["status"] == "stalled", (path, r.text)
            assert seconds < 0.5
        held.join()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/live").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(url + "/health").json() == {"status": "ok"}


class SlowTokenizer:
    """The server's tokenizer, with an encode that holds its thread (as megabytes of text do)."""

    def __init__(self, inner, seconds: float):
        self.inner, self.seconds = inner, seconds

    def encode(self, text, add_special_tokens=True):
        time.sleep(self.seconds)
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenizing_does_not_block_other_connections(engine):
    app = create_app(engine, served_model_name="tiny", max_tokens_limit=4)
    state = app.state.server
    state.tokenizer = SlowTokenizer(state.tokenizer, 2.0)
    with serving(app) as url:
        result = {}

        def complete():
            # Refused after tokenizing (max_tokens above the limit): no generation needed.
            result["r"] = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 8},
                                     timeout=30)

        t = threading.Thread(target=complete)
        t.start()
        time.sleep(0.3)
        r, seconds = timed_get(url + "/health")
        assert r.status_code == 200 and seconds < 1.0, seconds
        t.join()
        assert result["r"].status_code == 400 and "max_tokens" in result["r"].text


@pytest.mark.slow  # holds the engine thread 4 s
def test_adapter_load_and_unload_do_not_run_on_the_engine_thread(engine, files):
    """Reading and validating an adapter happens on a worker thread: with the engine thread held (a long
    step), a load and an unload still complete at once."""
    app = create_app(engine, served_model_name="tiny", adapter_root=str(files["adapter_root"]))
    with serving(app) as url:
        held = hold_engine_thread(app, 4.0)
        time.sleep(0.3)
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "offthread", "lora_path": "nested/late"},
                       timeout=30)
        assert r.status_code == 200, r.text
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "offthread"}, timeout=30)
        assert r.status_code == 200, r.text
        assert time.perf_counter() - t0 < 2.0
        assert held.is_alive()  # the engine thread was busy all along
        held.join()


def test_adapter_registered_with_the_engine_directly_is_served(engine, files):
    """The server's own list of names follows adapters that a Python caller registers on the engine."""
    app = create_app(engine, served_model_name="tiny", max_tokens_limit=4)
    with serving(app) as url:
        body = {"model": "direct", "prompt": [5, 6, 7], "max_tokens": 8}
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 404
        engine.load_adapter("direct", str(files["late"]))
        try:
            r = httpx.post(url + "/v1/completions", json=body, timeout=30)
            # Past the name check, refused only for max_tokens: no generation needed to tell.
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        finally:
            engine.unload_adapter("direct")
