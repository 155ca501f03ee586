"""Server processes through their whole life: starting (probes and requests answered 503 while the model
loads), limits on slow or excess connections and long requests, runtime adapters kept in --state-file
across a restart, and SIGTERM draining the requests in flight."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.server.support import STARTUP_TIMEOUT_S, assert_error, expected, follow_output, token_prompts

REPO = Path(__file__).resolve().parents[2]


class Process:
    """``slora-jax serve`` with ``flags``: its output is kept; ``url`` is known once it has bound."""

    def __init__(self, files, env, *flags):
        argv = [sys.executable, "-m", "slora_jax", "serve", "--model", str(files["model"]), "--host", "127.0.0.1",
                "--port", "0", "--dtype", "float32", "--num-pages", "512", "--kernel-backend", "xla",
                "--served-model-name", "tiny", *flags]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=str(REPO))
        self.lines: list[str] = []
        self.url = None
        bound = follow_output(self)
        if not bound.wait(STARTUP_TIMEOUT_S):
            self.kill()
            raise RuntimeError("server did not bind:\n" + self.log())

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("never ready:\n" + self.log())

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def in_flight(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("slora_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


def wait_in_flight(url: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while in_flight(url) < n:
        assert time.monotonic() < deadline, f"never {n} requests in flight"
        time.sleep(0.02)


def wait_in_flight_below(url: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while in_flight(url) >= n:
        assert time.monotonic() < deadline, f"requests still in flight after {timeout} s"
        time.sleep(0.02)


def read_stream(lines) -> list:
    """Every ``data:`` payload among an SSE response's ``lines``, parsed, up to and including '[DONE]'."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
            if data == "[DONE]":
                break
    return events


def in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()), daemon=True)
    t.start()
    return t, out


LONG = dict(model="tiny", prompt=[5, 6, 7], max_tokens=240, ignore_eos=True, temperature=0)


# ------------------------------------------------------------------------------------------------- limits

@pytest.fixture(scope="module")
def limits_server(files, server_env):
    # A request deadline of half a second: 32 choices of 240 tokens on the tiny model took just under 1 s on an idle
    # 2-core machine (CI, 2026-12-01), so a deadline of 1 s did not always end them.
    p = Process(files, server_env, "--max-pending", "40", "--request-timeout", "0.5", "--header-timeout", "1",
                "--body-timeout", "1", "--max-connections", "8")
    try:
        p.wait_ready()
        # Compile the shapes the tests use (a request past the deadline still compiles in the engine).
        httpx.post(p.url + "/v1/completions", json={**LONG, "n": 32}, timeout=300)
        httpx.post(p.url + "/v1/completions", json={**LONG, "max_tokens": 4}, timeout=300)
        yield p
    finally:
        p.sigterm()
        assert p.wait() == 0, p.log()


def test_request_deadline_and_retry_after(limits_server):
    """32 choices of 240 tokens run past --request-timeout 0.5: while they run, another 16 are over
    --max-pending (429 with Retry-After); then the request ends with a 504 and a stream with an error
    event followed by [DONE]."""
    url = limits_server.url
    t, out = in_thread(lambda: httpx.post(url + "/v1/completions", json={**LONG, "n": 32}, timeout=60))
    wait_in_flight(url, 32)
    r = httpx.post(url + "/v1/completions", json={**LONG, "n": 16}, timeout=60)
    assert_error(r, 429, "over_capacity")
    assert int(r.headers["retry-after"]) >= 1
    assert_error(httpx.post(url + "/v1/completions", json={**LONG, "n": 41}, timeout=60), 400)
    t.join(60)
    err = assert_error(out["r"], 504, "request_timeout")
    assert "--request-timeout" in err["message"]
    with httpx.stream("POST", url + "/v1/completions", json={**LONG, "n": 32, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200
        events = read_stream(resp.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout", events[-3:]
    wait_in_flight_below(url, 1)  # the requests ended by the deadline released their places
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def _connect(url: str) -> socket.socket:
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    return s


def _read_until_closed(s: socket.socket, limit_s: float) -> tuple[bytes, float]:
    t0, data = time.monotonic(), b""
    s.settimeout(limit_s)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    return data, time.monotonic() - t0


def test_half_sent_headers_are_closed_with_408(limits_server):
    s = _connect(limits_server.url)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
    data, seconds = _read_until_closed(s, 10)
    assert data.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in data, data
    assert seconds < 5
    s = _connect(limits_server.url)  # a connection that sends nothing at all
    data, seconds = _read_until_closed(s, 10)
    assert data.startswith(b"HTTP/1.1 408") and seconds < 5, data


def test_half_sent_body_is_answered_408(limits_server):
    s = _connect(limits_server.url)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"model\": ")
    data, seconds = _read_until_closed(s, 10)
    assert data.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in data, data
    assert seconds < 5


def test_connections_beyond_the_cap_get_503(limits_server):
    socks = [_connect(limits_server.url) for _ in range(10)]
    try:
        answers = []
        for s in socks:
            s.settimeout(0.5)
            try:
                answers.append(s.recv(4096))
            except socket.timeout:
                answers.append(b"")
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(refused) >= 2 and all(b"too_many_connections" in a for a in refused), answers
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    assert httpx.get(limits_server.url + "/health", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------------------- life

@pytest.mark.slow  # two server runs, ~15 s on two cores
def test_start_state_file_and_sigterm_drain(files, server_env, tmp_path, reference):
    """Run 1 starts (503 'starting' first), loads an adapter at runtime (recorded in --state-file), and on
    SIGTERM lets a running stream finish. Run 2 has it back from the file; an unload is recorded; SIGTERM
    with a short --drain-timeout ends the requests still running with OpenAI errors."""
    state = tmp_path / "state" / "adapters.json"
    common = ("--adapter-root", str(files["adapter_root"]), "--state-file", str(state))
    first = Process(files, server_env, *common, "--drain-timeout", "60")
    try:
        r = httpx.get(first.url + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "starting", r.text
        assert httpx.get(first.url + "/live", timeout=10).json()["status"] == "starting"
        assert httpx.get(first.url + "/ready", timeout=10).status_code == 503
        r = httpx.post(first.url + "/v1/completions", json={**LONG, "max_tokens": 2}, timeout=10)
        if r.status_code == 503:  # the model may have finished loading in between
            assert_error(r, 503, "starting")
            assert r.headers["retry-after"]
        first.wait_ready()
        assert "loading the model" in first.log() and "ready" in first.log()
        for path in ("/health", "/live", "/ready"):
            assert httpx.get(first.url + path).json() == {"status": "ok"}
        r = httpx.post(first.url + "/v1/load_lora_adapter", json={"lora_name": "kept", "lora_path": "nested/late"})
        assert r.status_code == 200, r.text
        assert json.loads(state.read_text())["adapters"] == [{"name": "kept", "path": "nested/late"}]
        prompt = token_prompts(1, seed=97)[0]
        body = dict(model="kept", prompt=prompt, max_tokens=200, temperature=0, ignore_eos=True, stream=True,
                    return_token_ids=True)
        with httpx.stream("POST", first.url + "/v1/completions", json=body, timeout=120) as resp:
            lines = resp.iter_lines()
            head = next(line for line in lines if line.startswith("data: "))
            first.sigterm()
            events = [json.loads(head[len("data: "):])] + read_stream(lines)
        assert events[-1] == "[DONE]" and "error" not in events[-2], events[-2:]
        ids = sum((e["choices"][0]["token_ids"] for e in events[:-1]), [])
        assert ids == expected(reference, prompt, "late", 200, ignore_eos=True).token_ids
        assert first.wait() == 0, first.log()
        with pytest.raises(httpx.TransportError):
            httpx.get(first.url + "/health", timeout=5)
    finally:
        first.kill()

    second = Process(files, server_env, *common, "--drain-timeout", "0.3")
    try:
        second.wait_ready()
        models = {m["id"] for m in httpx.get(second.url + "/v1/models").json()["data"]}
        assert "kept" in models, models
        r = httpx.post(second.url + "/v1/completions", json=dict(model="kept", prompt=prompt, max_tokens=8,
                                                                 temperature=0, ignore_eos=True,
                                                                 return_token_ids=True), timeout=120)
        assert r.json()["choices"][0]["token_ids"] == expected(reference, prompt, "late", 8,
                                                               ignore_eos=True).token_ids
        assert httpx.post(second.url + "/v1/unload_lora_adapter", json={"lora_name": "kept"}).status_code == 200
        assert json.loads(state.read_text())["adapters"] == []
        plain, plain_out = in_thread(lambda: httpx.post(second.url + "/v1/completions", json={**LONG, "n": 32},
                                                        timeout=120))
        streamed = {}

        def stream():
            with httpx.stream("POST", second.url + "/v1/completions", json={**LONG, "n": 32, "stream": True},
                              timeout=120) as resp:
                streamed["status"] = resp.status_code
                streamed["events"] = read_stream(resp.iter_lines())

        st = threading.Thread(target=stream, daemon=True)
        st.start()
        wait_in_flight(second.url, 64)
        second.sigterm()
        plain.join(60)
        st.join(60)
        err = assert_error(plain_out["r"], 503, "shutting_down")
        assert "shut down" in err["message"]
        events = streamed["events"]
        assert streamed["status"] == 200 and events[-1] == "[DONE]", events[-3:]
        assert events[-2]["error"]["code"] == "shutting_down", events[-2]
        assert second.wait() == 0, second.log()
    finally:
        second.kill()



@pytest.mark.slow
def test_compile_progress_and_sigterm_while_starting(files, server_env, tmp_path):
    """--precompile shows its progress on the terminal and in the probes; SIGTERM before it is done ends
    the process at once rather than after the remaining compilations."""
    env = dict(server_env, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cold_cache"))  # really compile
    p = Process(files, env, "--precompile", "--max-batch-size", "1")
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not any("compiling up to" in line for line in p.lines):
            assert time.monotonic() < deadline and p.proc.poll() is None, p.log()
            time.sleep(0.05)
        total = int(re.search(r"compiling up to (\d+) step programs", p.log()).group(1))
        assert total > 2
        r = httpx.get(p.url + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "starting", r.text
        assert "compil" in r.json()["detail"]
        t0 = time.monotonic()
        p.sigterm()
        assert p.wait(30) == 0, p.log()
        assert time.monotonic() - t0 < 20
        assert "stopped while starting" in p.log() and "slora-jax: ready" not in p.log()
    finally:
        p.kill()


@pytest.mark.slow
def test_a_model_that_cannot_load_is_one_line_and_exit_1(files, server_env, tmp_path):
    """A folder that passes the checks made before binding (its config.json reads) but whose weights are
    damaged fails while loading: one line, exit 1."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(files["model"], broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])  # cut short
    p = Process(dict(files, model=broken), server_env)
    try:
        assert p.wait(120) == 1, p.log()
        errors = [line for line in p.lines if "error: cannot start" in line]
        assert len(errors) == 1 and "broken-model" in errors[0], p.log()
    finally:
        p.kill()


@pytest.mark.slow
def test_state_file_entries_that_no_longer_load_are_dropped(files, server_env, tmp_path):
    state = tmp_path / "adapters.json"
    state.write_text(json.dumps({"version": 1, "adapters": [
        {"name": "gone", "path": "no-such-adapter"}, {"name": "back", "path": "nested/late"},
        {"name": "a0", "path": "a0"}]}))
    p = Process(files, server_env, "--adapter-root", str(files["adapter_root"]), "--state-file", str(state),
                "--adapter", f"a0={files['adapters']['a0']}")
    try:
        p.wait_ready()
        models = {m["id"] for m in httpx.get(p.url + "/v1/models").json()["data"]}
        assert {"back", "a0"} <= models and "gone" not in models, models
        assert "cannot load 'gone'" in p.log() and "'a0' is already loaded" in p.log()
        # The next runtime change rewrites the file with what the server really serves.
        r = httpx.post(p.url + "/v1/load_lora_adapter", json={"lora_name": "more", "lora_path": "a1"})
        assert r.status_code == 200, r.text
        assert json.loads(state.read_text())["adapters"] == [{"name": "back", "path": "nested/late"},
                                                             {"name": "more", "path": "a1"}]
        p.sigterm()
        assert p.wait() == 0
    finally:
        p.kill()
