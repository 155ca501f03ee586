"""Top alternatives (`logprobs: k`, chat `top_logprobs`), prompt log-probabilities (`echo`) and vLLM's
/tokenize and /detokenize, against a real server; values checked against the in-process engine's logits
with a log-softmax computed here, and its sampled tokens' log-probabilities from the decode path."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.server.support import ENGINE_CONFIG, MODEL, assert_error, expected, serving, token_prompts

GREEDY = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def tok(files):
    return Tokenizer.from_file(str(files["model"] / "tokenizer.json"))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def reference_logprobs(reference, tokens, adapter) -> np.ndarray:
    """[len(tokens) - 1, V]: the distribution of tokens[1:] given what precedes each."""
    return log_softmax(reference.logits([list(tokens[:-1])], adapters=[adapter])[0])


def test_completion_top_alternatives_match_the_engine(client, reference, tok):
    prompt = token_prompts(1, seed=51)[0]
    want = expected(reference, prompt, "a1", 5, ignore_eos=True, logprobs=True)
    r = client.completions.create(model="a1", prompt=prompt, max_tokens=5, temperature=0, logprobs=4,
                                  extra_body=GREEDY)
    c = r.choices[0]
    assert c.token_ids == want.token_ids
    assert c.logprobs.tokens == [tok.decode([t]) for t in want.token_ids]
    assert all(len(top) <= 5 and c.logprobs.tokens[i] in top for i, top in enumerate(c.logprobs.top_logprobs))
    # Token names as ids ("token_id:N", vLLM's option) make the alternatives exact to compare.
    r = client.completions.create(model="a1", prompt=prompt, max_tokens=5, temperature=0, logprobs=4,
                                  extra_body={**GREEDY, "return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in want.token_ids]
    # The sampled tokens' values agree with the decode path's (the server's come from a scoring pass).
    np.testing.assert_allclose(lp.token_logprobs, want.logprobs, atol=1e-4)
    ref = reference_logprobs(reference, prompt + want.token_ids, "a1")[len(prompt) - 1:]
    for i, top in enumerate(lp.top_logprobs):
        best = np.argsort(-ref[i])[:4]
        expect = {f"token_id:{t}": ref[i, t] for t in best}
        # The top 4, plus the sampled token (already among them: greedy picked the most likely).
        assert set(top) == set(expect), (i, top)
        for s, v in expect.items():
            assert top[s] == pytest.approx(v, abs=1e-4)
        assert max(top.values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)


def test_echo_scores_the_prompt(client, reference, tok):
    """What lm-evaluation-harness's loglikelihood requests send: echo, logprobs 1, max_tokens 1."""
    prompt = token_prompts(1, seed=52, low=8)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True,
                                  extra_body={"return_token_ids": True})
    c = r.choices[0]
    gen = c.token_ids
    assert len(gen) == 1
    assert c.text == tok.decode(prompt) + tok.decode(gen)
    assert c.logprobs.tokens == [tok.decode([t]) for t in prompt + gen]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True,
                                  extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in prompt + gen]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference_logprobs(reference, prompt + gen, None)
    want = ref[np.arange(len(prompt + gen) - 1), np.array(prompt[1:] + gen)]
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-4)
    for i, top in enumerate(lp.top_logprobs[1:]):
        # The prompt's own token and the most likely one (the same token where the prompt was greedy).
        best = int(np.argmax(ref[i]))
        assert set(top) == {lp.tokens[i + 1], f"token_id:{best}"}, top
        assert top[f"token_id:{best}"] == pytest.approx(ref[i, best], abs=1e-4)


def test_echo_with_text_prompts_and_n(http, reference, tok):
    r = http.post("/v1/completions", json={"model": "a0", "prompt": ["hello", "abc"], "max_tokens": 2, "n": 2,
                                          "temperature": 0, "echo": True, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 4
    for c in choices:
        prompt_text = ["hello", "abc"][c["index"] // 2]
        ids = tok.encode(prompt_text).ids
        want = expected(reference, ids, "a0", 2, ignore_eos=True)
        assert c["text"] == prompt_text + tok.decode(want.token_ids)
        assert c["logprobs"] is None


def test_chat_top_logprobs(client, reference, tok):
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="a2", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body=GREEDY)
    c = r.choices[0]
    prompt = list("<|user|>hi\n<|assistant|>".encode())  # the test template over the byte tokenizer
    ref = reference_logprobs(reference, prompt + c.token_ids, "a2")[len(prompt) - 1:]
    assert len(c.logprobs.content) == 4
    for i, item in enumerate(c.logprobs.content):
        assert item.token == tok.decode([c.token_ids[i]])
        assert item.logprob == pytest.approx(ref[i, c.token_ids[i]], abs=1e-4)
        best = np.argsort(-ref[i])[:3]
        assert [t.token for t in item.top_logprobs] == [tok.decode([int(b)]) for b in best]
        np.testing.assert_allclose([t.logprob for t in item.top_logprobs], ref[i, best], atol=1e-4)
        assert item.top_logprobs[0].bytes == list(item.top_logprobs[0].token.encode())


def _completion_streamed(client, **kw) -> dict[int, dict]:
    """Every chunk of a streamed completion, joined per choice: text and each logprobs list."""
    joined: dict[int, dict] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            j = joined.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [],
                                            "text_offset": [], "chunks": 0})
            j["text"] += c.text
            j["chunks"] += 1
            if c.logprobs is not None:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    j[key] += getattr(c.logprobs, key)
    return joined


def _assert_same_logprobs(streamed: dict, whole) -> None:
    """Streamed logprobs equal the non-streamed answer's: the same tokens, offsets and alternatives, values to
    float32 rounding (the stream scores each prefix in its own pass)."""
    assert streamed["tokens"] == whole.tokens
    assert streamed["text_offset"] == whole.text_offset
    assert [x is None for x in streamed["token_logprobs"]] == [x is None for x in whole.token_logprobs]
    np.testing.assert_allclose([x for x in streamed["token_logprobs"] if x is not None],
                               [x for x in whole.token_logprobs if x is not None], atol=1e-5)
    assert len(streamed["top_logprobs"]) == len(whole.top_logprobs)
    for got, want in zip(streamed["top_logprobs"], whole.top_logprobs):
        if want is None:
            assert got is None
            continue
        assert set(got) == set(want), (got, want)
        for s in want:
            assert got[s] == pytest.approx(want[s], abs=1e-5)


def test_streamed_top_alternatives_equal_the_non_streamed_ones(client):
    prompt = token_prompts(1, seed=53, low=6)[0]
    kw = dict(model="a1", prompt=prompt, max_tokens=6, temperature=0, logprobs=3, n=2,
              extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    whole = client.completions.create(**kw)
    streamed = _completion_streamed(client, **kw)
    assert sorted(streamed) == [0, 1]
    for c in whole.choices:
        s = streamed[c.index]
        assert s["chunks"] > 2  # really streamed, one chunk per step, not one block at the end
        assert s["text"] == c.text
        assert len(s["tokens"]) == 6
        _assert_same_logprobs(s, c.logprobs)
        assert all(len(top) == 3 or len(top) == 4 for top in s["top_logprobs"])


def test_streamed_echo_sends_the_prompt_and_its_logprobs_first(client, tok):
    """lm-evaluation-harness's loglikelihood request, streamed; two prompts, each choice echoes its own."""
    prompts = token_prompts(2, seed=54, low=5, high=9)
    kw = dict(model="a0", prompt=prompts, max_tokens=3, temperature=0, logprobs=2, echo=True,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    first = {}
    for chunk in chunks:
        for c in chunk.choices:
            first.setdefault(c.index, c)
    for i, prompt in enumerate(prompts):
        # The first chunk of each choice is its prompt: text, tokens and their logprobs, the first unscored.
        assert first[i].text == tok.decode(prompt) and first[i].finish_reason is None
        assert first[i].logprobs.tokens == [tok.decode([t]) for t in prompt]
        assert first[i].logprobs.token_logprobs[0] is None and first[i].logprobs.text_offset[0] == 0
        assert first[i].model_extra["prompt_token_ids"] == prompt and first[i].model_extra["token_ids"] == []
    streamed = _completion_streamed(client, **kw)
    for c in whole.choices:
        assert streamed[c.index]["text"] == c.text
        _assert_same_logprobs(streamed[c.index], c.logprobs)
    # echo without logprobs streams the prompt's text alone.
    plain = _completion_streamed(client, **{**kw, "logprobs": None})
    assert [plain[c.index]["text"] for c in whole.choices] == [c.text for c in whole.choices]
    assert all(not p["tokens"] for p in plain.values())


def test_streamed_chat_top_logprobs_equal_the_non_streamed_ones(client):
    kw = dict(model="a2", messages=[{"role": "user", "content": "hey"}], max_tokens=5, temperature=0,
              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    items = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                items += c.logprobs.content
    assert len(items) == len(whole) == 5
    for got, want in zip(items, whole):
        assert got.token == want.token and got.bytes == want.bytes
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t.token for t in got.top_logprobs] == [t.token for t in want.top_logprobs]
        np.testing.assert_allclose([t.logprob for t in got.top_logprobs], [t.logprob for t in want.top_logprobs],
                                   atol=1e-5)
        assert len(got.top_logprobs) == 3


def test_tokenize_and_detokenize(http, tok):
    text = "héllo wörld"
    r = http.post("/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode(text).ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 256
    assert body["token_strs"] == [tok.id_to_token(t) for t in body["tokens"]]
    r = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": text}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == list("<|user|>hi\n<|assistant|>".encode())
    info = http.get("/tokenizer_info").json()
    assert info["chat_template"] and "eos_token" in info
    assert_error(http.post("/tokenize", json={"model": "no-such-model", "prompt": "x"}), 404, "model_not_found")
    assert_error(http.post("/detokenize", json={"tokens": [10**6]}), 400)
    assert_error(http.post("/tokenize", json={}), 400)



def test_scoring_is_bounded_per_request(reference, monkeypatch):
    """A scoring pass that would return more logits than the bound is refused (400) before it runs."""
    import asyncio

    from slora_jax.server import logprobs
    from slora_jax.server.errors import APIError

    vocab = reference.model_config.vocab_size
    monkeypatch.setattr(logprobs, "MAX_SCORED_LOGITS", 10 * vocab)
    # 11 tokens are scored (the last token of each sequence needs no logits): one over the bound.
    with pytest.raises(APIError) as info:
        asyncio.run(logprobs.score(None, reference, None, [[5] * 6, [7] * 7], 1))
    assert info.value.status == 400 and "up to 10 tokens" in info.value.message


def test_a_stream_that_would_score_past_the_bound_is_refused_before_it_starts(files, monkeypatch):
    """A stream scores each chunk with everything before it, up to prompt + max_tokens - 1 tokens in one pass:
    past the bound it is a 400 answered before any token is generated, not an error in the middle of a stream."""
    import httpx

    import slora_jax as sj
    from slora_jax.server import logprobs
    from slora_jax.server.app import create_app

    engine = sj.Engine.from_pretrained(files["model"], config=sj.EngineConfig(**ENGINE_CONFIG))
    monkeypatch.setattr(logprobs, "MAX_SCORED_LOGITS", 10 * engine.model_config.vocab_size)
    body = {"model": MODEL, "prompt": [5, 6, 7, 8, 9, 10], "logprobs": 2, "stream": True, "ignore_eos": True,
            "temperature": 0}
    with serving(create_app(engine, served_model_name=MODEL)) as url:
        err = assert_error(httpx.post(url + "/v1/completions", json={**body, "max_tokens": 6}, timeout=60), 400)
        assert "up to 10 tokens" in err["message"] and err["param"] == "logprobs", err
        assert engine.stats()["steps"] == 0  # refused before anything ran
        r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 5}, timeout=120)  # 10 tokens: fits
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
        assert '"error"' not in r.text and r.text.count('"token_logprobs"') >= 5
