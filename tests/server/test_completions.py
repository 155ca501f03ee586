"""Completions and chat completions over HTTP equal the in-process engine's answers; streaming equals
non-streaming; text is what the `tokenizers` library decodes; stop strings, stop ids, n, seeds, logprobs."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.server.support import MODEL, START_ADAPTERS, adapter_of, expected, sse_events, token_prompts

GREEDY_EXTRA = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def tok(files):
    """The checkpoint's tokenizer read by the `tokenizers` library itself (independent of the server)."""
    return Tokenizer.from_file(str(files["model"] / "tokenizer.json"))


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(START_ADAPTERS) | {MODEL} <= set(models)
    assert models[MODEL].parent is None
    for name in START_ADAPTERS:
        assert models[name].parent == MODEL
        assert models[name].location in ("disk", "host", "device")
        assert models[name].rank == START_ADAPTERS[name][0]


def test_token_prompt_completions_match_engine_per_adapter(client, reference, tok):
    prompt = token_prompts(1, seed=11)[0]
    seen = set()
    for model in [MODEL, *START_ADAPTERS]:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body=GREEDY_EXTRA)
        want = expected(reference, prompt, adapter_of(model), 10, ignore_eos=True)
        c = r.choices[0]
        assert c.token_ids == want.token_ids, model
        assert c.text == tok.decode(want.token_ids), model
        assert c.finish_reason == "length"
        assert r.model == model and r.object == "text_completion"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 10)
        seen.add(tuple(c.token_ids))
    assert len(seen) >= 3  # adapters really change the answer, so equality above is not vacuous


@pytest.mark.slow
def test_text_prompts_n_and_seeds(client, reference, tok):
    texts = ["The quick brown fox", "héllo wörld"]
    r = client.completions.create(model="a1", prompt=texts, n=2, max_tokens=8, temperature=0.9, top_p=0.95,
                                  seed=1234, extra_body={"ignore_eos": True, "return_token_ids": True, "top_k": 40})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        ids = list(texts[c.index // 2].encode())
        want = expected(reference, ids, "a1", 8, ignore_eos=True, temperature=0.9, top_p=0.95, top_k=40,
                        seed=1234 + c.index % 2)
        assert c.token_ids == want.token_ids
        assert c.text == tok.decode(want.token_ids)
    assert r.choices[0].token_ids != r.choices[1].token_ids  # n choices draw different samples
    assert r.usage.prompt_tokens == sum(len(t.encode()) for t in texts)


@pytest.mark.slow
def test_streaming_equals_non_streaming(client, http):
    body = dict(model="a0", prompt="stream me", max_tokens=12, temperature=0.7, seed=7, n=2,
                ignore_eos=True, return_token_ids=True)
    whole = http.post("/v1/completions", json=body).json()
    with http.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                      "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    for c in whole["choices"]:
        parts = [ch["choices"][0] for ch in chunks if ch["choices"][0]["index"] == c["index"]]
        assert "".join(p["text"] for p in parts) == c["text"]
        assert sum((p["token_ids"] for p in parts), []) == c["token_ids"]
        assert [p["finish_reason"] for p in parts][-1] == c["finish_reason"] == "length"
        assert all(p["finish_reason"] is None for p in parts[:-1])
    # The official client reads the same stream.
    stream = client.completions.create(model="a0", prompt="stream me", max_tokens=12, temperature=0.7, seed=7,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in stream) == whole["choices"][0]["text"]


def _chat_prompt(messages) -> list[int]:
    """The test's chat template rendered by hand, as UTF-8 bytes (= token ids of the byte tokenizer)."""
    text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
    return list(text.encode())


def test_chat_matches_engine_and_streams(client, reference, tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model="a2", messages=messages, max_completion_tokens=9, temperature=0,
                                       extra_body=GREEDY_EXTRA)
    prompt = _chat_prompt(messages)
    want = expected(reference, prompt, "a2", 9, ignore_eos=True)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == tok.decode(want.token_ids)
    assert r.choices[0].token_ids == want.token_ids
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(prompt)
    stream = client.chat.completions.create(model="a2", messages=messages, max_tokens=9, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # Content given as a list of text parts renders the same.
    parts = [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             messages[1]]
    r2 = client.chat.completions.create(model="a2", messages=parts, max_tokens=9, temperature=0,
                                        extra_body=GREEDY_EXTRA)
    assert r2.choices[0].token_ids == want.token_ids


def _first_clean_window(text: str, start: int, width: int = 2):
    for i in range(start, len(text) - width):
        piece = text[i:i + width]
        if "\ufffd" not in piece and piece.strip():
            return piece
    return None


def test_stop_strings_cut_text_and_stop_generation(client, http, reference, tok):
    prompt = token_prompts(1, seed=21)[0]
    want = expected(reference, prompt, "a0", 40, ignore_eos=True)
    full = tok.decode(want.token_ids)
    stop = _first_clean_window(full, 4)
    assert stop is not None, full
    cut = full.index(stop)
    # The stop string is completed by the first token whose prefix text contains it.
    k = next(k for k in range(1, len(want.token_ids) + 1) if stop in tok.decode(want.token_ids[:k]))
    body = dict(model="a0", prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "never-there"],
                ignore_eos=True, return_token_ids=True)
    r = http.post("/v1/completions", json=body).json()
    c = r["choices"][0]
    assert c["text"] == full[:cut] and c["finish_reason"] == "stop"
    assert c["token_ids"] == want.token_ids[:k]
    assert r["usage"]["completion_tokens"] == k
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        events = sse_events(resp.iter_lines())
    streamed = [e["choices"][0] for e in events[:-1]]
    assert "".join(p["text"] for p in streamed) == full[:cut]  # the stop string never shows, even in part
    assert streamed[-1]["finish_reason"] == "stop"
    # Stop by token id: the engine's own stop, with the same id.
    stop_id = want.token_ids[5]
    want_ids = expected(reference, prompt, "a0", 40, ignore_eos=True, stop_token_ids=(stop_id,))
    r = client.completions.create(model="a0", prompt=prompt, max_tokens=40, temperature=0,
                                  extra_body={**GREEDY_EXTRA, "stop_token_ids": [stop_id]})
    assert r.choices[0].token_ids == want_ids.token_ids and r.choices[0].finish_reason == "stop"
    assert r.choices[0].token_ids[-1] == stop_id


def test_logprobs(client, reference):
    prompt = token_prompts(1, seed=31)[0]
    want = expected(reference, prompt, "a1", 6, ignore_eos=True, logprobs=True)
    r = client.completions.create(model="a1", prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                                  extra_body=GREEDY_EXTRA)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6
    # vLLM's shape for logprobs=0: each position's dict holds the sampled token alone.
    assert [list(d.values()) for d in lp.top_logprobs] == [[x] for x in lp.token_logprobs]
    np.testing.assert_allclose(lp.token_logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
    assert all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                          temperature=0, logprobs=True, extra_body=GREEDY_EXTRA)
    want_chat = expected(reference, _chat_prompt([{"role": "user", "content": "x"}]), "a1", 5, ignore_eos=True,
                         logprobs=True)
    got = [e.logprob for e in chat.choices[0].logprobs.content]
    np.testing.assert_allclose(got, want_chat.logprobs, rtol=1e-5, atol=1e-5)


def test_default_max_tokens_and_eos(client, reference):
    """Without ignore_eos the model's EOS (id 2) ends a choice with 'stop', as in the engine."""
    prompt = token_prompts(1, seed=41)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, extra_body={"return_token_ids": True})
    want = expected(reference, prompt, None, 16)  # the OpenAI default max_tokens is 16
    assert r.choices[0].token_ids == want.token_ids
    assert r.choices[0].finish_reason == want.finish_reason
