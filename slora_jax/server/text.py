"""Text on the server side: the checkpoint's tokenizer, incremental detokenization and stop strings.

The server tokenizes prompts itself and hands the engine token ids, so streamed text, stop strings and
usage counts all come from one place.
"""

from __future__ import annotations

from typing import Sequence

from slora_jax.server.errors import bad_request

_REPLACEMENT = "\ufffd"


def server_tokenizer(engine):
    """The engine's tokenizer as a ``slora_jax.model.checkpoint.Tokenizer`` (chat template included), or
    None when the checkpoint has no tokenizer.json."""
    tok = getattr(engine, "tokenizer", None)
    if tok is not None and hasattr(tok, "render_chat"):
        return tok
    model_dir = getattr(engine, "model_dir", None)
    if model_dir is not None:
        from slora_jax.model.checkpoint import Tokenizer

        found = Tokenizer.from_dir(model_dir, engine.model_config)
        if found is not None:
            return found
    if tok is not None:  # a bare tokenizers.Tokenizer: text works, chat does not
        from slora_jax.model.checkpoint import Tokenizer

        return Tokenizer(tok, tuple(engine.model_config.eos_token_ids))
    return None


class IncrementalDetokenizer:
    """Token ids in, text deltas out; the concatenated deltas equal one decode of all the ids.

    Decodes a sliding window (as text-generation-inference does) so that tokenizers whose pieces depend on
    their left neighbour (leading spaces) stay right, and holds back a trailing incomplete UTF-8 sequence
    until the bytes that complete it arrive.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: the token after the last clean text boundary but one
        self._read = 0  # tokens whose text was already returned

    def add(self, token: int) -> str:
        """Append one token; returns the text it completes ('' while a character is incomplete)."""
        self.ids.append(int(token))
        if self.tok is None:
            return ""
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
        new_text = self.tok.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character), as the tokenizer decodes it."""
        if self.tok is None or self._read == len(self.ids):
            return ""
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
        new_text = self.tok.decode(self.ids[self._prefix:])
        self._prefix, self._read = self._read, len(self.ids)
        return new_text[len(prefix_text):]


class ChoiceText:
    """The text of one completion choice: detokenized incrementally, cut at the first stop string.

    ``take()`` returns the text not sent yet, holding back the last ``len(longest stop) - 1`` characters
    until the end, so a stream never shows the start of a stop string that the final text cuts off.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.stopped = False
        self._sent = 0

    def add(self, token: int) -> bool:
        """Append one generated token; True when a stop string ended the text (the caller stops)."""
        return self._extend(self.detok.add(token))

    def finish(self) -> None:
        if not self.stopped:
            self._extend(self.detok.flush())

    def _extend(self, delta: str) -> bool:
        if not delta or self.stopped:
            return self.stopped
        start = max(0, len(self.text) - self._hold)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def take(self, final: bool) -> str:
        """Text not returned before; everything when ``final``."""
        end = len(self.text) if (final or self.stopped) else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent:end]
        self._sent = end
        return out


def decode_token(tokenizer, token: int) -> str:
    """One token's text for logprobs; ``token_id:N`` when there is no tokenizer (as vLLM does)."""
    if tokenizer is None:
        return f"token_id:{int(token)}"
    return tokenizer.decode([int(token)], skip_special_tokens=False)


def encode_prompt(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    if tokenizer is None:
        raise bad_request("this model has no tokenizer.json: give prompts as lists of token ids", "prompt")
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def prompt_char_limit(tokenizer, max_model_len: int) -> int:
    """Characters beyond which a text cannot fit the context, so it is refused before tokenizing (which
    costs seconds for megabytes): no token covers more characters than the vocabulary's longest entry,
    so a text of more than ``max_model_len`` times that many characters has more than ``max_model_len``
    tokens. (Byte-level vocabularies spell one byte per character, so the bound holds for them too.)"""
    longest = 1
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    get_vocab = getattr(inner, "get_vocab", None)
    if get_vocab is not None:
        try:
            longest = max((len(t) for t in get_vocab(with_added_tokens=True)), default=1)
        except TypeError:
            longest = max((len(t) for t in get_vocab()), default=1)
    return max_model_len * max(longest, 1)


def refuse_long_text(chars: int, limit: int, max_model_len: int, param: str) -> None:
    if chars > limit:
        raise bad_request(f"the {param} has {chars} characters: more than {limit} cannot fit this model's context "
                          f"of {max_model_len} tokens", param)
