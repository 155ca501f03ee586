"""Constants and helpers shared by the server tests: the test files' layout, a byte-level tokenizer, prompts,
the reference engine's answers and response checks."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import uvicorn

import slora_jax as sj

API_KEY = "test-key-123"
MODEL = "tiny"  # --served-model-name of the main server
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> (rank, target modules): loaded at start.
START_ADAPTERS = {"a0": (8, ("q_proj", "v_proj")), "a1": (16, ALL), "a2": (4, ("gate_proj", "up_proj", "down_proj"))}
LATE_ADAPTER = ("late", 8, ALL)  # under the adapter root, loaded at runtime by tests
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ENGINE_CONFIG = dict(dtype="float32", num_pages=512, kernel_backend="xla")
STARTUP_TIMEOUT_S = 240
LIMITED = dict(max_pending=4, max_tokens_limit=8, max_body_bytes=16384)  # the limited server


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the byte-level pre-tokenizer and decoder use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_byte_tokenizer(model_dir: Path) -> None:
    """tokenizer.json whose token id is the UTF-8 byte (256 ids = the model's vocab), plus a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


def token_prompts(n: int, seed: int, low: int = 3, high: int = 20) -> list[list[int]]:
    """Random token-id prompts (ids 3..249: no BOS/EOS) of random lengths in [low, high)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=int(rng.integers(low, high))).tolist() for _ in range(n)]


def expected(reference, prompt, adapter, max_tokens, **sampling) -> "sj.RequestOutput":
    """The reference engine's answer to one request."""
    sp = sj.SamplingParams(max_tokens=max_tokens, **sampling)
    return reference.generate([list(prompt)], adapters=[adapter], sampling=sp)[0]


def adapter_of(model: str):
    return None if model == MODEL else model


def assert_error(resp, status: int, code=None) -> dict:
    """The response is an OpenAI error object with ``status`` (and ``code`` when given)."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    assert "code" in err, body
    if code is not None:
        assert err["code"] == code, body
    return err


def sse_events(lines) -> list:
    """Parsed ``data:`` payloads of a server-sent-event stream, up to and including ``[DONE]``."""
    out = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", line
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            out.append(data)
            break
        out.append(json.loads(data))
    return out


def follow_output(server) -> threading.Event:
    """Drain ``server.proc``'s output into ``server.lines`` on a thread (so the pipe never fills) and set
    ``server.url`` from the address it prints once it has bound; the returned event is set then."""
    bound = threading.Event()

    def drain():
        for line in server.proc.stdout:
            server.lines.append(line.rstrip())
            m = re.search(r"serving .* on (http://\S+)", line)
            if m and server.url is None:
                server.url = m.group(1)
                bound.set()

    threading.Thread(target=drain, daemon=True).start()
    return bound


@contextlib.contextmanager
def serving(app):
    """``app`` on 127.0.0.1 (a free port) in a uvicorn thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
