"""vLLM's tokenizer routes: ``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``.

Load generators and evaluation harnesses (lm-evaluation-harness's remote tokenizer) count and split text
with the server's own tokenizer through these. The handlers are plain functions, so FastAPI runs them in its
worker threads: a long text never holds the event loop.
"""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from pydantic import Field

from slora_jax.server.errors import bad_request, model_not_found
from slora_jax.server.protocol import ChatMessage, _Body
from slora_jax.server.text import refuse_long_text

MAX_TOKENIZE_CHARS = 1 << 20


class TokenizeRequest(_Body):
    """A ``prompt`` (text) or ``messages`` (rendered with the chat template first), as vLLM takes them."""

    model: Optional[str] = Field(None, max_length=512)
    prompt: Optional[str] = Field(None, max_length=MAX_TOKENIZE_CHARS)
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, max_length=4096)
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages (vLLM's)
    add_generation_prompt: Optional[bool] = True
    return_token_strs: Optional[bool] = False


class DetokenizeRequest(_Body):
    model: Optional[str] = Field(None, max_length=512)
    tokens: list[int] = Field(max_length=1 << 20)


def add_tokenize_routes(app: FastAPI, state, responses: dict) -> None:
    """Register the routes on ``app``; ``state`` is the app's ServerState."""

    def tokenizer_for(model: Optional[str]):
        if model is not None and model != state.model_name and model not in state.admin.names:
            raise model_not_found(f"the model {model!r} does not exist (GET /v1/models lists them)")
        if state.tokenizer is None:
            raise bad_request("this model has no tokenizer.json (start the server with --tokenizer DIR)")
        return state.tokenizer

    @app.post("/tokenize", responses=responses)
    def tokenize(body: TokenizeRequest):
        tok = tokenizer_for(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give either prompt (text) or messages", "prompt")
        if body.messages is not None:
            text = render_messages(tok, body.messages, bool(body.add_generation_prompt))
            special = bool(body.add_special_tokens)
        else:
            text = body.prompt
            special = body.add_special_tokens is None or body.add_special_tokens
        refuse_long_text(len(text), state.max_prompt_chars, state.engine.max_model_len, "prompt")
        ids = tok.encode(text, add_special_tokens=special)
        strs = [tok.tokenizer.id_to_token(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize", responses=responses)
    def detokenize(body: DetokenizeRequest):
        tok = tokenizer_for(body.model)
        vocab = min(tok.vocab_size, state.engine.model_config.vocab_size)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/tokenizer_info", responses=responses)
    def tokenizer_info():
        tok = tokenizer_for(None)
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token,
                "eos_token": tok.eos_token, "chat_template": tok.chat_template,
                "model_max_length": state.engine.max_model_len, "vocab_size": tok.vocab_size}


def render_messages(tok, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """The chat template applied to OpenAI-style messages (text parts joined), or a 400 naming why not."""
    if getattr(tok, "chat_template", None) is None:
        raise bad_request("this model has no chat template (start the server with --chat-template FILE)",
                          "messages")
    from jinja2.exceptions import TemplateError

    flat = []
    for m in messages:
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(part.text for part in m.content)
        msg = {"role": m.role, "content": content or ""}
        if m.name is not None:
            msg["name"] = m.name
        flat.append(msg)
    try:
        return tok.render_chat(flat, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise bad_request(f"the chat template refused these messages: {e}", "messages")
