"""Request bodies of the HTTP API (OpenAI completions/chat, vLLM adapter management), as pydantic models.

Values are checked strictly (a string is not an int); unknown fields are ignored as the OpenAI API does.
Fields the engine cannot honour are accepted only at their neutral value, and refused otherwise with a
message naming them. ``top_k``, ``stop_token_ids``, ``ignore_eos``, ``return_token_ids`` and
``return_tokens_as_token_ids`` are vLLM's extensions of the same names.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

INT64 = dict(ge=-(2**63), lt=2**63)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: Optional[bool] = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1, max_length=512)
    n: Optional[int] = Field(1, ge=1, le=64)
    temperature: Optional[float] = Field(None, ge=0.0, le=100.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1, le=1 << 20)
    seed: Optional[int] = Field(None, **INT64)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = Field(None, max_length=64)
    ignore_eos: Optional[bool] = False
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    return_token_ids: Optional[bool] = False
    return_tokens_as_token_ids: Optional[bool] = False  # logprobs name tokens "token_id:N" (exact keys)
    user: Optional[str] = None


class CompletionRequest(_Sampling):
    """POST /v1/completions. ``prompt``: a string, a list of strings, a list of token ids, or a list of
    lists of token ids (one choice set per prompt)."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = False
    best_of: Optional[int] = Field(None, ge=1, le=64)
    suffix: Optional[str] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ResponseFormat(_Body):
    type: str


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions: the messages are rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict]] = None
    tool_choice: Optional[Union[str, dict]] = None
    add_generation_prompt: Optional[bool] = True


class LoadLoraRequest(_Body):
    """POST /v1/load_lora_adapter (vLLM): ``lora_path`` relative to ``--adapter-root`` or absolute inside it."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraRequest(_Body):
    """POST /v1/unload_lora_adapter (vLLM). ``drain`` (an extension, off by default as in vLLM): new requests
    for the adapter get 404 at once, the ones in flight finish, then it unloads; if they have not finished
    within ``drain_timeout`` seconds (default 60) it serves again and the call answers 400."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: Optional[int] = None
    drain: Optional[bool] = False
    drain_timeout: Optional[float] = Field(None, ge=0.0, le=3600.0)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo
