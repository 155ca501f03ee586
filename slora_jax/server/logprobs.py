"""Log-probabilities in the OpenAI/vLLM response formats: the sampled tokens', their top alternatives, and the
prompt's (``echo``).

The engine reports the log-probability of each sampled token as it samples. Top alternatives and prompt
log-probabilities come from one scoring pass (``engine.logits``) over prompt + output after generation: the
logits at position i give the distribution of token i+1, so one pass scores every token but the first. The
pass runs on the engine thread between two steps; the softmax over the vocabulary runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from slora_jax.server.errors import bad_request
from slora_jax.server.text import decode_token

# vLLM's floor for -inf (JSON has no infinities).
MIN_LOGPROB = -9999.0
# The scoring pass returns every position's logits to the host: bound them (1 GiB of float32) per request.
MAX_SCORED_LOGITS = 1 << 28


@dataclass
class Scored:
    """Scores of tokens 1..n-1 of one sequence: ``logprobs[i]`` is token i+1's log-probability, ``top_ids[i]``
    / ``top_logprobs[i]`` the ``k`` most likely tokens at that position, most likely first."""

    logprobs: np.ndarray  # [n-1] float32
    top_ids: np.ndarray  # [n-1, k] int
    top_logprobs: np.ndarray  # [n-1, k] float32


def score_logits(logits: np.ndarray, tokens: Sequence[int], k: int) -> Scored:
    """Scores of ``tokens[1:]`` from ``logits`` [len(tokens) - 1, V] (the logits of ``tokens[:-1]``)."""
    x = np.asarray(logits, np.float32)
    m = x.max(axis=-1, keepdims=True)
    logp = x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))
    targets = np.asarray(tokens[1:], np.int64)
    chosen = logp[np.arange(len(targets)), targets]
    if k <= 0:
        return Scored(chosen, np.zeros((len(targets), 0), np.int64), np.zeros((len(targets), 0), np.float32))
    k = min(k, logp.shape[-1])
    part = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return Scored(chosen, np.take_along_axis(part, order, axis=-1), np.take_along_axis(vals, order, axis=-1))


async def score(loop, engine, adapter: Optional[str], sequences: list[list[int]], k: int) -> list[Scored]:
    """Score every sequence (prompt + output) with ``adapter`` in one pass of ``engine.logits``.

    The last token of a sequence needs no logits of its own, so each is scored without it: a sequence that
    fills the context still fits."""
    heads = [list(s[:-1]) for s in sequences]
    refuse_over_bound(engine, sum(len(h) for h in heads))
    logits = await loop.call(lambda: engine.logits(heads, [adapter] * len(heads)))
    return await asyncio.to_thread(lambda: [score_logits(x, s, k) for x, s in zip(logits, sequences)])


def refuse_over_bound(engine, tokens: int) -> None:
    """400 when one scoring pass over ``tokens`` tokens would return more logits than MAX_SCORED_LOGITS."""
    vocab = engine.model_config.vocab_size
    if tokens * vocab > MAX_SCORED_LOGITS:
        raise bad_request(f"prompt log-probabilities and alternatives are served for up to "
                          f"{MAX_SCORED_LOGITS // vocab} tokens per request (prompts + outputs, all choices)",
                          "logprobs")


async def score_tail(loop, engine, adapter: Optional[str], sequence: Sequence[int], count: int, k: int) -> Scored:
    """Scores of the last ``count`` tokens of ``sequence``: the same pass as ``score`` (everything before the
    last token), of which only the last ``count`` rows leave the engine thread."""
    seq = list(sequence)
    refuse_over_bound(engine, len(seq) - 1)
    logits = await loop.call(lambda: np.array(engine.logits([seq[:-1]], [adapter])[0][-count:]))
    return await asyncio.to_thread(score_logits, logits, seq[-count - 1:], k)


def _name(tokenizer, token: int, as_ids: bool) -> str:
    # Several ids can decode to the same text (a lone byte of a multi-byte character is U+FFFD): vLLM's
    # return_tokens_as_token_ids names them exactly.
    return f"token_id:{int(token)}" if as_ids else decode_token(tokenizer, token)


def _lp(x) -> float:
    return max(float(x), MIN_LOGPROB)


def completion_logprobs(tokenizer, token_ids: Sequence[int], logprobs: Sequence[Optional[float]],
                        tops: Optional[Sequence[Optional[list[tuple[int, float]]]]], offset: int = 0,
                        as_ids: bool = False) -> dict:
    """``choices[i].logprobs`` of /v1/completions: tokens, their log-probabilities, text offsets and, per token,
    a dict of the token itself and its top alternatives (``tops[i]``, None for an unscored first token)."""
    tokens = [_name(tokenizer, t, as_ids) for t in token_ids]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top_out = []
    for i, (tok, lp) in enumerate(zip(tokens, logprobs)):
        if lp is None:
            top_out.append(None)
            continue
        # vLLM's shape: the token itself first, then the alternatives (the token once if it is among them).
        entry = {tok: _lp(lp)}
        for tid, tlp in (tops[i] if tops is not None and tops[i] is not None else ()):
            entry.setdefault(_name(tokenizer, tid, as_ids), _lp(tlp))
        top_out.append(entry)
    return {"tokens": tokens, "token_logprobs": [None if lp is None else _lp(lp) for lp in logprobs],
            "top_logprobs": top_out, "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: Sequence[int], logprobs: Sequence[float],
                  tops: Optional[Sequence[list[tuple[int, float]]]], as_ids: bool = False) -> dict:
    """``choices[i].logprobs`` of /v1/chat/completions: per token its text, log-probability, UTF-8 bytes and
    the ``top_logprobs`` most likely tokens at its position."""
    def item(tid, lp) -> dict:
        s = _name(tokenizer, tid, as_ids)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}

    content = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs)):
        c = item(t, lp)
        c["top_logprobs"] = [item(tid, tlp) for tid, tlp in tops[i]] if tops is not None else []
        content.append(c)
    return {"content": content}


def tops_of(scored: Scored, start: int, stop: int) -> list[list[tuple[int, float]]]:
    """Top alternatives of tokens ``start..stop-1`` (token indices of the scored sequence, start >= 1)."""
    return [list(zip(scored.top_ids[i - 1].tolist(), scored.top_logprobs[i - 1].tolist()))
            for i in range(start, stop)]


class StreamLogprobs:
    """The ``logprobs`` of each streamed chunk, equal to what the same request answers without ``stream``.

    ``scored`` (top alternatives, or ``echo`` with logprobs): each delta's new tokens are scored as they
    arrive, by a scoring pass over the prompt and the tokens so far, as the non-streamed answer scores them all
    at the end; else the sampler's log-probabilities are used, as there. Completions' ``text_offset`` runs on
    over the token strings (prompt first with ``echo``), as the non-streamed answer counts them."""

    def __init__(self, tokenizer, loop, engine, adapter: Optional[str], *, chat: bool, k: int, scored: bool,
                 as_ids: bool):
        self.tokenizer, self.loop, self.engine, self.adapter = tokenizer, loop, engine, adapter
        self.chat, self.k, self.scored, self.as_ids = chat, k, scored, as_ids
        self._outputs: dict[int, list[int]] = {}  # choice index -> tokens generated so far
        self._offsets: dict[int, int] = {}  # choice index -> text offset of its next token

    async def prompt(self, index: int, prompt: Sequence[int]) -> dict:
        """Completions' ``logprobs`` of the echoed prompt of choice ``index``; its first token has no score."""
        lps: list = [None]
        tops: list = [None]
        if len(prompt) > 1:
            sc = (await score(self.loop, self.engine, self.adapter, [list(prompt)], self.k))[0]
            lps += sc.logprobs.tolist()
            tops += tops_of(sc, 1, len(prompt))
        return self._completion(index, list(prompt), lps, tops)

    async def delta(self, index: int, prompt: Sequence[int], token_ids: list[int], sampled: list[float]) -> dict:
        """``logprobs`` of the new tokens ``token_ids`` of choice ``index`` (``sampled``: the sampler's values)."""
        out = self._outputs.setdefault(index, [])
        out += token_ids
        tops = None
        if self.scored and token_ids:
            sc = await score_tail(self.loop, self.engine, self.adapter, list(prompt) + out, len(token_ids), self.k)
            sampled, tops = sc.logprobs.tolist(), tops_of(sc, 1, len(token_ids) + 1)
        if self.chat:
            return chat_logprobs(self.tokenizer, token_ids, sampled, tops, self.as_ids)
        return self._completion(index, token_ids, sampled, tops or [None] * len(token_ids))

    def _completion(self, index: int, ids: list[int], lps: list, tops: list) -> dict:
        lp = completion_logprobs(self.tokenizer, ids, lps, tops, self._offsets.get(index, 0), self.as_ids)
        self._offsets[index] = self._offsets.get(index, 0) + sum(len(t) for t in lp["tokens"])
        return lp
