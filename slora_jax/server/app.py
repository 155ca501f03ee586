"""The OpenAI-compatible HTTP server: routes, request -> engine choices, responses and server-sent events.

    app = create_app(engine, served_model_name="llama", adapter_root="/srv/adapters", api_key="...")
    uvicorn.run(app, host="127.0.0.1", port=8000)

or ``slora-jax serve --model DIR ...`` (``run_server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slora_jax.server import logprobs as lpfmt
from slora_jax.server.adapter_admin import AdapterAdmin, StateFile, shown_path
from slora_jax.server.autoload import AdapterAutoloader
from slora_jax.server.engine_loop import EngineFailed, EngineLoop
from slora_jax.server.errors import APIError, bad_request, from_engine_error, over_capacity, unavailable
from slora_jax.server.generation import ChoiceResult, ChoiceRun, ChoiceSpec, Delta, Generation
from slora_jax.server.guard import RequestGuard
from slora_jax.server.lifecycle import Lifecycle
from slora_jax.server.metrics import CONTENT_TYPE, ServerMetrics
from slora_jax.server.paths import adapter_root as resolve_root
from slora_jax.server.protocol import (ChatCompletionRequest, CompletionRequest, ErrorResponse, LoadLoraRequest,
                                       UnloadLoraRequest, _Sampling)
from slora_jax.server.text import (encode_prompt, prompt_char_limit, refuse_long_text,
                                   server_tokenizer)
from slora_jax.server.tokenize import add_tokenize_routes
from slora_jax.types import SamplingParams

log = logging.getLogger("slora_jax.server")

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_CHOICES = 256  # prompts x n in one request


class ServerState:
    """Everything the routes share. One per app."""

    def __init__(self, engine, served_model_name: str, adapter_root: Optional[Path], max_tokens_limit: int,
                 max_pending: int, metrics: ServerMetrics, lifecycle: Lifecycle, state_file: Optional[StateFile],
                 runtime_adapters: Optional[dict]):
        self.engine = engine
        # /metrics reads what the engine thread publishes after its steps; a scrape never waits for a step.
        self.loop = EngineLoop(engine, on_snapshot=lambda stats, adapters: metrics.set_engine_snapshot(
            stats, adapters, up=True))
        self.tokenizer = server_tokenizer(engine)
        self.model_name = served_model_name
        self.adapter_root = adapter_root
        self.max_tokens_limit = max_tokens_limit
        self.max_pending = max_pending
        self.metrics = metrics
        self.lifecycle = lifecycle
        lifecycle.engine_loop = self.loop
        self.model_dir = getattr(engine, "model_dir", None)
        self.admin = AdapterAdmin(engine, self.loop, adapter_root, served_model_name, state_file, runtime_adapters,
                                  hidden_paths=(self.model_dir,) if self.model_dir else ())
        self.max_prompt_chars = prompt_char_limit(self.tokenizer, engine.max_model_len) if self.tokenizer else 0
        self.pending = 0  # engine requests started by handlers and not closed yet (event-loop thread only)
        self.created = int(time.time())


def create_app(engine, *, served_model_name: Optional[str] = None, api_key: Optional[str] = None,
               adapter_root: Optional[str] = None, max_body_bytes: int = 4 << 20,
               max_tokens_limit: Optional[int] = None, max_pending: int = 4096, state_file=None,
               runtime_adapters: Optional[dict] = None, lifecycle: Optional[Lifecycle] = None,
               body_timeout_s: Optional[float] = None, tokenizer=None,
               load_on_request: bool = True) -> Any:
    """The ASGI app serving ``engine``. The engine thread starts and stops with the app's lifespan.

    served_model_name: the ``model`` value meaning "no adapter" (default: the checkpoint folder's name).
    api_key: when set, every route but the probes and /metrics needs ``Authorization: Bearer <api_key>``.
    adapter_root: folder that /v1/load_lora_adapter may load from; None disables runtime loading.
    max_body_bytes: larger request bodies get 413. max_tokens_limit: largest ``max_tokens`` accepted
    (default: the engine's context length). max_pending: engine requests in flight before 429.
    state_file: path (or StateFile) where runtime loads and unloads are recorded; runtime_adapters: the
    adapters already replayed from it (name -> path). lifecycle: phase, probes, request deadline and stall
    timeout (default: a Lifecycle that is ready once the app starts). body_timeout_s: 408 for a body slower.
    tokenizer: a ``slora_jax.model.checkpoint.Tokenizer`` (default: the checkpoint's).
    load_on_request: with ``adapter_root``, a request naming a folder under it loads that adapter first.
    """
    name = served_model_name or _default_model_name(engine)
    metrics = ServerMetrics()
    lifecycle = lifecycle or Lifecycle()
    if state_file is not None and not isinstance(state_file, StateFile):
        state_file = StateFile(state_file)
    state = ServerState(engine, name, resolve_root(adapter_root), max_tokens_limit or engine.max_model_len,
                        max_pending, metrics, lifecycle, state_file, runtime_adapters)
    if tokenizer is not None:
        state.tokenizer = tokenizer
        state.max_prompt_chars = prompt_char_limit(tokenizer, engine.max_model_len)
    state.autoload = AdapterAutoloader(state.admin, load_on_request,
                                       lambda result: metrics.adapter_ops.labels("load", result).inc())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop.start()
        lifecycle.aio = asyncio.get_running_loop()
        if lifecycle.phase == "starting":
            lifecycle.phase = "ready"
        try:
            yield
        finally:
            state.loop.stop()
            state.admin.close()

    app = FastAPI(title="slora-jax", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible completions over one base model and many LoRA adapters.")
    app.state.server = state
    _install_error_handlers(app, metrics)
    _add_routes(app, state)
    add_tokenize_routes(app, state, ERROR_RESPONSES)
    _document_errors(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s,
                       on_error=lambda status: metrics.http_errors.labels(str(status)).inc())
    return app


# --------------------------------------------------------------------------------------------- errors


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def answer(err: APIError) -> JSONResponse:
        metrics.http_errors.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return answer(bad_request(_validation_message(exc), _validation_param(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return answer(APIError(exc.status_code, str(exc.detail), kind, str(exc.status_code)))

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError):
        # json's parser recurses per nesting level: a deeply nested body is the client's error, and a 500
        # here would also close the connection.
        return answer(bad_request("the request body is nested too deeply"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return answer(from_engine_error(exc))


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid value')}")
    return "invalid request: " + "; ".join(parts)


def _validation_param(exc: RequestValidationError) -> Optional[str]:
    errors = exc.errors()
    loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"] if errors else []
    return loc[0] if loc else None


_ERRORS = {400: "Bad request (invalid or unsupported parameters)", 401: "Missing or invalid API key",
           403: "Adapter path outside --adapter-root, or runtime loading disabled",
           404: "Unknown model or adapter", 413: "Request body too large",
           429: "Over capacity: retry after the Retry-After header's seconds",
           503: "Starting, shutting down or engine not running", 504: "Request ran past --request-timeout"}


ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in _ERRORS.items()}


def _document_errors(app: FastAPI) -> None:
    """OpenAPI: every operation answers errors with ErrorResponse (400 where FastAPI would say 422)."""
    base = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = base()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


# --------------------------------------------------------------------------------------------- routes


def _add_routes(app: FastAPI, state: ServerState) -> None:
    def probe(answer):
        status, body = answer()
        return JSONResponse(body, status_code=status)

    @app.get("/health")
    async def health():
        """200 when requests can be served now; 503 ``starting``, ``draining``, ``stalled`` or ``stopped``."""
        return probe(state.lifecycle.ready)

    @app.get("/ready")
    async def ready():
        """Kubernetes readiness: as /health."""
        return probe(state.lifecycle.ready)

    @app.get("/live")
    async def live():
        """Kubernetes liveness: 200 while the engine makes progress (or the server is starting)."""
        return probe(state.lifecycle.live)

    @app.get("/metrics")
    async def prometheus():
        state.metrics.set_engine_snapshot(None, None, up=state.loop.alive)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def models():
        return model_list(state, await asyncio.to_thread(state.engine.list_adapters))

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        adapter = await _adapter_for(state, body.model)
        prompts = await asyncio.to_thread(_completion_prompts, state, body.prompt)  # tokenizing is slow
        _refuse_unsupported(body)
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise bad_request("best_of must equal n (candidates are not ranked)", "best_of")
        specs = _choice_specs(state, body, prompts, body.max_tokens, want_logprobs=body.logprobs is not None)
        return await _respond(state, adapter, specs, body, request, prompts, chat=False)

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = await _adapter_for(state, body.model)
        _refuse_unsupported(body)
        if body.tools:
            raise bad_request("tools are not supported", "tools")
        if body.response_format is not None and body.response_format.type != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
        if body.top_logprobs and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise bad_request("max_tokens and max_completion_tokens disagree", "max_completion_tokens")
        prompt = await asyncio.to_thread(_chat_prompt, state, body)  # rendering and tokenizing are slow
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        specs = _choice_specs(state, body, [prompt], max_tokens, want_logprobs=bool(body.logprobs))
        return await _respond(state, adapter, specs, body, request, [prompt], chat=True)

    @app.post("/v1/load_lora_adapter", responses=ERROR_RESPONSES)
    async def load_lora_adapter(body: LoadLoraRequest):
        try:
            info = await state.admin.load(body.lora_name, body.lora_path)
        except Exception:
            state.metrics.adapter_ops.labels("load", "error").inc()
            raise
        state.metrics.adapter_ops.labels("load", "ok").inc()
        return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' added successfully.",
                "adapter": _adapter_json(info, state.adapter_root)}

    @app.post("/v1/unload_lora_adapter", responses=ERROR_RESPONSES)
    async def unload_lora_adapter(body: UnloadLoraRequest):
        try:
            await state.admin.unload(body.lora_name, drain=bool(body.drain), timeout_s=body.drain_timeout)
        except Exception:
            state.metrics.adapter_ops.labels("unload", "error").inc()
            raise
        state.metrics.adapter_ops.labels("unload", "ok").inc()
        return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}


def model_list(state: ServerState, adapters) -> dict:
    """The body of GET /v1/models: the base model, then every adapter of ``adapters`` (AdapterInfo)."""
    base_root = Path(state.model_dir).name if state.model_dir else state.model_name
    data = [_model_card(state.model_name, state.created, root=base_root, parent=None, location="device")]
    for info in adapters:
        card = _model_card(info.name, state.created, root=shown_path(info.path, state.adapter_root),
                           parent=state.model_name, location=info.location)
        card.update(rank=info.rank, target_modules=list(info.target_modules))
        data.append(card)
    return {"object": "list", "data": data}


def _model_card(model_id: str, created: int, root: str, parent: Optional[str], location: str) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "slora-jax", "root": root,
            "parent": parent, "location": location}


def _adapter_json(info, root: Optional[Path]) -> dict:
    return {"name": info.name, "path": shown_path(info.path, root), "rank": info.rank,
            "target_modules": list(info.target_modules), "location": info.location}


# --------------------------------------------------------------------------------------------- requests


async def _adapter_for(state: ServerState, model: str) -> Optional[str]:
    """None for the base model's name, else the adapter name (checked now, so unknown names and adapters
    being unloaded get 404; a folder under the adapter root is loaded first when loading on request is on)."""
    try:
        return state.admin.adapter_for(model)
    except APIError as e:
        if e.status != 404 or not await state.autoload.load(model):
            raise
    return state.admin.adapter_for(model)


def _refuse_unsupported(body: _Sampling) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise bad_request(f"{name} is not supported (only 0)", name)
    if body.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")


def _completion_prompts(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif not prompt:
        raise bad_request("prompt is empty", "prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    out = []
    for p in prompts:
        if isinstance(p, str) and state.tokenizer is not None:
            refuse_long_text(len(p), state.max_prompt_chars, state.engine.max_model_len, "prompt")
        ids = encode_prompt(state.tokenizer, p) if isinstance(p, str) else list(p)
        if not ids:
            raise bad_request("prompt is empty", "prompt")
        out.append(ids)
    return out


def _chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    tok = state.tokenizer
    if tok is None or getattr(tok, "chat_template", None) is None:
        raise bad_request("this model has no chat template (tokenizer_config.json 'chat_template'): "
                          "use /v1/completions", "messages")
    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(part.text for part in m.content)
        msg = {"role": m.role, "content": content or ""}
        if m.name is not None:
            msg["name"] = m.name
        messages.append(msg)
    refuse_long_text(sum(len(m["content"]) for m in messages), state.max_prompt_chars, state.engine.max_model_len,
                     "messages")
    from jinja2.exceptions import TemplateError

    try:
        text = tok.render_chat(messages, add_generation_prompt=bool(body.add_generation_prompt))
    except TemplateError as e:
        raise bad_request(f"the chat template refused these messages: {e}", "messages")
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("the rendered chat prompt is empty", "messages")
    return ids


def _choice_specs(state: ServerState, body: _Sampling, prompts: list[list[int]], max_tokens: Optional[int],
                  want_logprobs: bool) -> list[ChoiceSpec]:
    """One ChoiceSpec per (prompt, n); ``max_tokens`` None means up to the context length."""
    n = body.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts x n={n} exceeds {MAX_CHOICES} choices per request", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters",
                          "stop")
    if any(stop) and state.tokenizer is None:
        raise bad_request("stop strings need a tokenizer; this model has none (use stop_token_ids)", "stop")
    if max_tokens is not None and max_tokens > state.max_tokens_limit:
        raise bad_request(f"max_tokens={max_tokens} is above this server's limit of {state.max_tokens_limit}",
                          "max_tokens")
    context = state.engine.max_model_len
    specs = []
    for i, ids in enumerate(prompts):
        if len(ids) >= context:
            raise bad_request(f"this model's maximum context length is {context} tokens; the prompt has "
                              f"{len(ids)}", "prompt")
        mt = max_tokens if max_tokens is not None else min(state.max_tokens_limit, context - len(ids))
        if len(ids) + mt > context:
            raise bad_request(f"this model's maximum context length is {context} tokens; you requested "
                              f"{len(ids) + mt} ({len(ids)} in the prompt, {mt} to generate)", "max_tokens")
        for j in range(n):
            seed = None if body.seed is None else (body.seed + j) % (1 << 63)
            sampling = SamplingParams(
                max_tokens=mt, temperature=1.0 if body.temperature is None else float(body.temperature),
                top_p=1.0 if body.top_p is None else float(body.top_p),
                top_k=0 if body.top_k in (None, -1) else body.top_k, seed=seed,
                stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=bool(body.ignore_eos),
                logprobs=want_logprobs)
            specs.append(ChoiceSpec(i * n + j, ids, sampling, tuple(s for s in stop if s)))
    return specs


def _start(state: ServerState, adapter: Optional[str], specs: list[ChoiceSpec]) -> Generation:
    """Admission control, then every choice into the engine (validated there; errors become 4xx)."""
    state.lifecycle.refuse_if_not_serving()
    if not state.loop.alive:
        raise unavailable("the engine is not running")
    if len(specs) > state.max_pending:  # could never be admitted: retrying is pointless
        raise bad_request(f"this request has {len(specs)} choices (prompts x n), more than this server ever runs "
                          f"at once ({state.max_pending}, --max-pending)", "n")
    if state.pending + len(specs) > state.max_pending:
        raise over_capacity(f"{state.pending} requests are in flight (limit {state.max_pending}); retry later")
    state.admin.acquire(adapter, len(specs))
    model = adapter if adapter is not None else state.model_name
    runs = [ChoiceRun(state.loop, state.tokenizer, adapter, model, s, state.metrics) for s in specs]
    state.pending += len(runs)
    state.metrics.in_flight.set(state.pending)

    def release():
        state.pending -= len(runs)
        state.metrics.in_flight.set(state.pending)
        state.admin.release(adapter, len(runs))
        state.lifecycle.untrack(gen)

    gen = Generation(runs, on_close=release)
    state.lifecycle.track(gen)
    try:
        gen.start()
    except EngineFailed as e:
        raise unavailable(str(e))
    except Exception as e:
        raise from_engine_error(e)
    return gen


async def _respond(state: ServerState, adapter, specs, body, request: Request, prompts, *, chat: bool):
    """Start the choices; stream them (SSE) or wait for all and answer in one body (499 if the client left)."""
    meta = _Meta(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time()), body.model, body, chat=chat)
    k, scored = _scoring(meta)
    if body.stream and scored:  # each delta is scored with everything before it: refuse now, not mid-stream
        lpfmt.refuse_over_bound(state.engine, max(len(s.prompt_ids) + s.sampling.max_tokens - 1 for s in specs))
    gen = _start(state, adapter, specs)
    if body.stream:
        return _sse(gen, meta, state, lpfmt.StreamLogprobs(state.tokenizer, state.loop, state.engine, adapter,
                                                           chat=chat, k=k, scored=scored, as_ids=meta.as_ids))
    results = await _collect(gen, request)
    if results is None:
        return Response(status_code=499)
    scores = await _scores(state, adapter, meta, results, prompts)
    return (_chat_body if chat else _completion_body)(meta, results, state, prompts, scores)


async def _scores(state: ServerState, adapter, meta: "_Meta", results: list[ChoiceResult], prompts):
    """Scores of prompt + output of every choice, when the answer needs more than the sampled tokens'
    log-probabilities (echo, top alternatives); else None."""
    k, scored = _scoring(meta)
    if not scored:
        return None
    n = meta.body.n or 1
    sequences = [prompts[r.index // n] + r.token_ids for r in results]
    try:
        return await lpfmt.score(state.loop, state.engine, adapter, sequences, k)
    except EngineFailed as e:
        raise unavailable(str(e))


def _scoring(meta: "_Meta") -> tuple[int, bool]:
    """(top alternatives asked for, whether the answer needs the scoring pass: alternatives, or the prompt's
    log-probabilities with echo)."""
    k = (meta.body.top_logprobs or 0) if meta.chat else (meta.body.logprobs or 0)
    return k, bool(k or (not meta.chat and meta.body.echo and meta.body.logprobs is not None))


async def _collect(gen: Generation, request: Request) -> Optional[list[ChoiceResult]]:
    """Run a non-streaming request; None (and every choice aborted) if the client disconnects first."""
    work = asyncio.ensure_future(gen.collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        return None
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
        gen.close()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --------------------------------------------------------------------------------------------- responses


class _Meta:
    def __init__(self, rid: str, created: int, model: str, body: _Sampling, chat: bool):
        self.id, self.created, self.model, self.body, self.chat = rid, created, model, body, chat
        self.token_ids = bool(body.return_token_ids)
        self.as_ids = bool(body.return_tokens_as_token_ids)
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_body(meta: _Meta, results: list[ChoiceResult], state: ServerState, prompts, scores=None) -> dict:
    want_lp = meta.body.logprobs is not None
    n = meta.body.n or 1
    choices = []
    for j, r in enumerate(results):
        prompt = prompts[r.index // n]
        text, logprobs = r.text, None
        if meta.body.echo:  # the prompt's text and, with logprobs, its tokens come first
            text = _prompt_text(state, meta.body.prompt, r.index // n, prompt) + r.text
        if want_lp and scores is None:
            logprobs = lpfmt.completion_logprobs(state.tokenizer, r.token_ids, r.logprobs,
                                                 [None] * len(r.token_ids), as_ids=meta.as_ids)
        elif want_lp:
            # Every log-probability from the one scoring pass, so a token's value and its alternatives'
            # agree; the first prompt token has no context and no score.
            sc, first = scores[j], 1 if meta.body.echo else len(prompt)
            ids = (prompt + r.token_ids)[first - 1 if meta.body.echo else first:]
            lps = ([None] if meta.body.echo else []) + sc.logprobs[first - 1:].tolist()
            tops = ([None] if meta.body.echo else []) + lpfmt.tops_of(sc, first, len(prompt) + len(r.token_ids))
            logprobs = lpfmt.completion_logprobs(state.tokenizer, ids, lps, tops, as_ids=meta.as_ids)
        c = {"index": r.index, "text": text, "finish_reason": r.finish_reason, "logprobs": logprobs}
        if meta.token_ids:
            c["token_ids"] = r.token_ids
            c["prompt_token_ids"] = prompts[r.index // (meta.body.n or 1)]
        choices.append(c)
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": _usage(sum(len(p) for p in prompts),
                                                sum(len(r.token_ids) for r in results))}


def _chat_body(meta: _Meta, results: list[ChoiceResult], state: ServerState, prompts, scores=None) -> dict:
    want_lp = bool(meta.body.logprobs)
    choices = []
    for j, r in enumerate(results):
        logprobs = None
        if want_lp and scores is None:
            logprobs = lpfmt.chat_logprobs(state.tokenizer, r.token_ids, r.logprobs, None, meta.as_ids)
        elif want_lp:
            start = len(prompts[0])
            logprobs = lpfmt.chat_logprobs(state.tokenizer, r.token_ids, scores[j].logprobs[start - 1:].tolist(),
                                           lpfmt.tops_of(scores[j], start, start + len(r.token_ids)), meta.as_ids)
        c = {"index": r.index, "message": {"role": "assistant", "content": r.text}, "logprobs": logprobs,
             "finish_reason": r.finish_reason}
        if meta.token_ids:
            c["token_ids"] = r.token_ids
        choices.append(c)
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": _usage(sum(len(p) for p in prompts),
                                                sum(len(r.token_ids) for r in results))}


def _sse_event(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _ClosingStreamingResponse(StreamingResponse):
    """Runs ``on_close`` however the stream ends (finished, client gone, cancelled)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(gen: Generation, meta: _Meta, state: ServerState, lps: lpfmt.StreamLogprobs) -> StreamingResponse:
    obj = "chat.completion.chunk" if meta.chat else "text_completion"
    n = meta.body.n or 1
    want_lp = bool(meta.body.logprobs) if meta.chat else meta.body.logprobs is not None

    def chunk(choices, usage=None) -> dict:
        out = {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model, "choices": choices}
        if meta.include_usage:
            out["usage"] = usage
        return out

    async def events():
        started: set[int] = set()
        prompt_tokens = sum(len(r.spec.prompt_ids) for r in gen.runs if r.spec.index % n == 0)
        completion_tokens = 0
        prompts = {r.spec.index: r.spec.prompt_ids for r in gen.runs}
        try:
            if not meta.chat and meta.body.echo:  # each choice's prompt first, as the non-streamed text has it
                for r in sorted(gen.runs, key=lambda r: r.spec.index):
                    i = r.spec.index
                    c = {"index": i, "text": _prompt_text(state, meta.body.prompt, i // n, prompts[i]),
                         "finish_reason": None, "logprobs": await lps.prompt(i, prompts[i]) if want_lp else None}
                    if meta.token_ids:
                        c.update(token_ids=[], prompt_token_ids=prompts[i])
                    yield _sse_event(chunk([c]))
            async for d in gen.deltas():
                completion_tokens += len(d.token_ids)
                if meta.chat and d.index not in started:
                    started.add(d.index)
                    yield _sse_event(chunk([{"index": d.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]))
                if not (d.text or d.finish_reason or (d.token_ids and (meta.token_ids or want_lp))):
                    continue
                logprobs = await lps.delta(d.index, prompts[d.index], d.token_ids, d.logprobs) if want_lp else None
                yield _sse_event(chunk([_delta_choice(meta, d, logprobs)]))
            if meta.include_usage:
                yield _sse_event(chunk([], _usage(prompt_tokens, completion_tokens)))
        except APIError as e:
            yield _sse_event(e.body())
        except Exception as e:  # the stream already started with 200: report in-band
            log.exception("stream failed")
            yield _sse_event(from_engine_error(e).body())
        yield b"data: [DONE]\n\n"

    return _ClosingStreamingResponse(events(), gen.close, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _delta_choice(meta: _Meta, d: Delta, logprobs: Optional[dict]) -> dict:
    if meta.chat:
        c = {"index": d.index, "delta": {"content": d.text} if d.text else {}, "logprobs": logprobs,
             "finish_reason": d.finish_reason}
    else:
        c = {"index": d.index, "text": d.text, "finish_reason": d.finish_reason, "logprobs": logprobs}
    if meta.token_ids:
        c["token_ids"] = d.token_ids
    return c


def _prompt_text(state: ServerState, prompt, i: int, ids: list[int]) -> str:
    """The text of prompt ``i`` as the request gave it, or decoded from its token ids."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[i], str):
        return prompt[i]
    return state.tokenizer.decode(ids) if state.tokenizer is not None else ""


# --------------------------------------------------------------------------------------------- process


def _default_model_name(engine) -> str:
    model_dir = getattr(engine, "model_dir", None)
    if model_dir:
        return Path(model_dir).name
    return engine.model_config.name


def _version() -> str:
    from slora_jax import __version__
    return __version__


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def engine_config(args):
    """The EngineConfig of a ``serve`` namespace; options left unset (None or absent) keep the config's defaults."""
    import slora_jax as sj

    optional = ("max_waiting", "max_model_len", "memory_fraction", "max_prefill_tokens", "seed", "pin_host_cache")
    extra = {k: getattr(args, k) for k in optional if getattr(args, k, None) is not None}
    if getattr(args, "max_loras", None) is not None:  # vLLM's name
        extra["max_adapters_on_device"] = args.max_loras
    if getattr(args, "max_cpu_loras", None) is not None:  # vLLM's counts adapters; the engine bounds bytes
        from slora_jax.server.startup import host_cache_bytes
        extra["host_cache_bytes"] = host_cache_bytes(args.max_cpu_loras, args.model, args.max_lora_rank,
                                                     sj.EngineConfig.page_rows, args.dtype)
    for flag, field in (("coordinator_address", "distributed_coordinator"), ("num_processes", "num_processes"),
                        ("process_id", "process_id")):
        if getattr(args, flag, None) is not None:
            extra[field] = getattr(args, flag)
    return sj.EngineConfig(dtype=args.dtype, kernel_backend=args.kernel_backend,
                           tensor_parallel=args.tensor_parallel, num_pages=args.num_pages,
                           max_batch_size=args.max_batch_size, max_lora_rank=args.max_lora_rank, **extra)


class ServeSetup:
    """What ``slora-jax serve`` checked in its flags before loading anything: the adapters named at start,
    the adapter root, the state file and the API key. Raises StartupError naming the first problem."""

    def __init__(self, args):
        from slora_jax.server.adapter_admin import check_adapter_name
        from slora_jax.server.startup import StartupError, parse_adapter_specs

        self.args = args
        self.adapters = parse_adapter_specs(args.adapter, getattr(args, "lora_modules", None) or [])
        for name, _ in self.adapters:
            try:
                check_adapter_name(name)
            except APIError as e:
                raise StartupError(f"--adapter: {e.message}")
        try:
            self.root = resolve_root(args.adapter_root)
        except ValueError as e:
            raise StartupError(str(e))
        opt = self.limits = _flags().serving_limits(args)
        self.state_file = StateFile(opt.state_file) if opt.state_file else None
        if self.state_file is not None and self.root is None:
            raise StartupError("--state-file records adapters loaded at runtime, which needs --adapter-root")
        if self.state_file is not None:
            try:
                self.state_file.read()  # unusable: say so now, not after minutes of loading
            except ValueError as e:
                raise StartupError(str(e))
        self.api_key = args.api_key or os.environ.get("SLORA_JAX_API_KEY") or None
        if not _is_loopback(args.host) and self.api_key is None:
            log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
        self.model_name = args.served_model_name or Path(args.model).expanduser().name

    def lifecycle(self) -> Lifecycle:
        return Lifecycle(stall_timeout_s=self.limits.stall_timeout, request_timeout_s=self.limits.request_timeout)

    def load_engine(self, adapters, progress=None):
        """The Engine of ``--model`` with ``adapters`` ([(name, dir)]) loaded and, when wanted, every step
        program compiled. ``progress``: a lifecycle.Progress that the probes report from."""
        import slora_jax as sj
        from slora_jax.engine.engine import precompile_wanted

        step = progress.step if progress is not None else (lambda *a: None)
        args = self.args
        t0 = time.perf_counter()
        step("loading the model", f"from {args.model}")
        engine = sj.Engine.from_pretrained(args.model, config=engine_config(args))
        step(f"model loaded in {time.perf_counter() - t0:.1f} s")
        for i, (name, path) in enumerate(adapters):
            step(f"loading adapter {i + 1}/{len(adapters)} {name!r}")
            engine.load_adapter(name, path)
        if precompile_wanted(getattr(args, "precompile", None)):
            t0 = time.perf_counter()
            total = 2 * len(engine.step_programs())  # greedy and sampling programs of each shape and variant
            step(f"compiling up to {total} step programs")
            done = engine.precompile(on_compiled=progress.compiling(total) if progress is not None else None)
            step(f"compiled {len(done)} step programs in {time.perf_counter() - t0:.0f} s")
        return engine

    def create_app(self, engine, lifecycle: Lifecycle, state_file=None, runtime_adapters=None):
        """The HTTP app over ``engine`` with every option of the flags."""
        from slora_jax.server.startup import load_tokenizer

        args = self.args
        return create_app(engine, served_model_name=args.served_model_name, api_key=self.api_key,
                          adapter_root=args.adapter_root, tokenizer=load_tokenizer(args, engine),
                          load_on_request=getattr(args, "load_adapters_on_request", True),
                          max_body_bytes=getattr(args, "max_body_bytes", None) or (4 << 20),
                          max_tokens_limit=getattr(args, "max_tokens_limit", None),
                          max_pending=getattr(args, "max_pending", None) or 4096, state_file=state_file,
                          runtime_adapters=runtime_adapters, lifecycle=lifecycle,
                          body_timeout_s=self.limits.body_timeout)


def _flags():
    from slora_jax.server import flags
    return flags


def configure_logging(args) -> str:
    log_level = getattr(args, "log_level", None) or "info"
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return log_level


def run_server(args) -> int:
    """``slora-jax serve``: bind, then load the model and adapters while /health answers 503 ``starting``,
    serve until SIGTERM/SIGINT, drain. Returns the exit code.

    Reads the ``serve`` namespace of slora_jax.cli; the API key may also come from SLORA_JAX_API_KEY."""
    from slora_jax.server.adapter_admin import replay_state
    from slora_jax.server.lifecycle import Progress, say, serve
    from slora_jax.server.startup import preflight

    log_level = configure_logging(args)
    setup = ServeSetup(args)
    opt, adapters, state_file = setup.limits, setup.adapters, setup.state_file
    if _check_processes(args, setup.root, state_file):
        return _follow(setup)
    sock = preflight(args, adapters)  # bad paths and a busy port fail here, before minutes of loading
    family = sock.family
    sock.listen(2048)  # connections queue from now on: probes may come as soon as the address is printed
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if family == socket.AF_INET6 else host
    lifecycle = setup.lifecycle()
    progress = Progress(lifecycle)
    say(f"serving {setup.model_name!r} and {len(adapters)} adapter(s) on http://{url_host}:{port} "
        "(/health answers 503 until the model is loaded)")

    built: list = []  # the engine, once loaded

    def build():
        engine = setup.load_engine(adapters, progress)
        built.append(engine)
        runtime = None
        if state_file is not None:
            progress.step("loading the adapters recorded in the state file", str(state_file.path))
            runtime = replay_state(engine, state_file, setup.root, {n for n, _ in adapters})
        return setup.create_app(engine, lifecycle, state_file, runtime)

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal: end with status 0.
    signal.signal(signal.SIGTERM, _interrupt)
    code = serve(build, sock, lifecycle, drain_s=opt.drain_timeout, header_timeout_s=opt.header_timeout,
                 max_connections=opt.max_connections, keep_alive_s=opt.keep_alive_timeout, log_level=log_level)
    if built:
        built[0].stop_followers()  # the other processes of the job end with this one
    return code


def _check_processes(args, root, state_file) -> bool:
    """Check the several-processes flags; True when this process is not process 0 (it follows, no HTTP)."""
    from sharding.distributed import check_distributed_args
    from slora_jax.server.startup import StartupError

    try:
        check_distributed_args(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
                               getattr(args, "process_id", None))
    except ValueError as e:
        raise StartupError(str(e).replace("coordinator_address", "--coordinator-address")
                           .replace("num_processes", "--num-processes").replace("process_id", "--process-id"))
    if (getattr(args, "num_processes", None) or 1) == 1:
        return False
    if root is not None or state_file is not None:
        # Runtime loads reach process 0 only; the others would serve without the adapter.
        raise StartupError("--adapter-root and --state-file load adapters at runtime, which a job of several "
                           "processes does not do: give every adapter at start (--adapter, --lora-modules)")
    return args.process_id != 0


def _follow(setup) -> int:
    """A process other than 0: load the model and the adapters as process 0 does, then run its steps on this
    process's devices until it stops."""
    from slora_jax.server.lifecycle import say

    args = setup.args
    say(f"process {args.process_id} of {args.num_processes}: loading {args.model}")
    engine = setup.load_engine(setup.adapters)
    say(f"process {args.process_id}: following process 0")
    engine.follow()
    say(f"process {args.process_id}: process 0 stopped")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
