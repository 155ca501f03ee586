"""Engine: the public entry point. Requests in, tokens out, over one base model and many adapters.

The loop is vLLM's: ``step()`` = schedule -> prepare inputs (numpy) -> run one jitted program -> update.
``add_request`` and ``abort`` are thread-safe (they go through an inbox drained at the start of a step), so
a server thread can feed the engine while another thread drives ``step()``.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import jax
import numpy as np

from sharding import make_mesh
from slora_jax.adapters.paging import AdapterTables
from slora_jax.adapters.store import AdapterStore
from slora_jax.config import EngineConfig, ModelConfig
from slora_jax.engine.request import Request, Status
from slora_jax.engine.runner import DTYPES, ModelRunner, bucket
from slora_jax.engine.scheduler import Scheduler, SchedulerOutput
from slora_jax.errors import AdapterError, CapacityError, ConfigError, RequestError
from slora_jax.memory.pool import PoolLayout, UnifiedPagePool
from slora_jax.types import AdapterInfo, RequestMetrics, RequestOutput, SamplingParams

Prompt = Union[str, Sequence[int]]


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def precompile_wanted(flag: Optional[bool]) -> bool:
    """Whether ``serve``/``bench`` compile every step program first: as asked, and by default (None) on the
    GPU, where compiling a step program on demand stalls the requests in flight for seconds."""
    return _on_gpu() if flag is None else flag


def _pool_pages(cfg: ModelConfig, econf: EngineConfig, layout: PoolLayout, device, shards: int = 1) -> int:
    """Pages from the config: an explicit count, else a fraction of the device memory left, else CPU bytes.
    With the pool split over ``shards`` devices, each device holds 1/shards of every page."""
    if econf.num_pages is not None:
        return econf.num_pages
    itemsize = np.dtype(DTYPES[econf.dtype]).itemsize
    per_page = layout.bytes_per_page(itemsize) // shards
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        # Keep room for activations and logits of the largest step.
        free -= 4 * econf.max_prefill_tokens * max(cfg.vocab_size, cfg.intermediate_size * 2) * 4
        return max(2, int(free * econf.memory_fraction // per_page))
    return max(2, econf.cpu_pool_bytes // per_page)


class Engine:
    """Serve a base model and any number of LoRA adapters. See ``from_pretrained``."""

    def __init__(self, model_config: ModelConfig, params: dict, config: Optional[EngineConfig] = None,
                 tokenizer=None, model_dir: Optional[str] = None):
        econf = config or EngineConfig()
        tp = econf.tensor_parallel
        if tp > len(jax.devices()):
            raise ConfigError(f"tensor_parallel={tp} but only {len(jax.devices())} device(s) are visible")
        if tp > 1 and econf.kernel_backend == "pallas":
            # XLA cannot partition a Pallas call by itself; the kernels compose with shard_map, which the
            # engine's step does not use yet.
            raise ConfigError("kernel_backend='pallas' runs on one device; use 'xla' or 'auto' with tensor_parallel > 1")
        if tp > 1 and model_config.num_kv_heads % tp:
            raise ConfigError(f"tensor_parallel={tp} must divide num_kv_heads={model_config.num_kv_heads}")
        mesh = make_mesh(tp) if tp > 1 else None
        self.model_config = model_config
        self.config = econf
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.max_model_len = econf.max_model_len or model_config.max_position_embeddings
        device = jax.devices()[0]
        backend = econf.kernel_backend
        if backend == "auto":
            backend = "pallas" if _on_gpu() and mesh is None else "xla"
        self.kernel_backend = backend
        # Weights go on the device first so that the pool is sized from the memory really left.
        self.runner = ModelRunner(model_config, econf, params, backend, device, mesh)
        unit = PoolLayout(model_config.num_layers, 1, econf.page_rows, model_config.kv_size)
        pages = _pool_pages(model_config, econf, unit, device, shards=tp)
        self.layout = PoolLayout(model_config.num_layers, pages, econf.page_rows, model_config.kv_size)
        self.runner.allocate_pool(self.layout)
        self.pool = UnifiedPagePool(self.layout)
        self._max_pages = -(-self.max_model_len // econf.page_rows)  # KV pages of the longest request
        self.tables = AdapterTables(model_config, self.layout, econf.max_adapters_on_device, econf.max_lora_rank)
        to_host = _pinned_host(device) if _on_gpu() else (lambda x: x)
        stage = None if mesh is None else (lambda tiles: jax.device_put(tiles, self.runner.replicated))
        self.adapters = AdapterStore(model_config, econf, self.layout, self.pool, self.tables,
                                     self.runner.write_pages, DTYPES[econf.dtype], to_host, stage)
        self.scheduler = Scheduler(econf, self.pool, self.adapters)
        self._inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self._requests: dict[str, Request] = {}
        self._listeners: dict[str, Callable[[RequestOutput], None]] = {}
        self._streaming: set[str] = set()  # requests whose partial outputs carry text
        self._finish_only: set[str] = set()  # requests whose caller reads only the final output
        self._step_lock = threading.RLock()
        self._inflight = None  # (device outputs, requests) of a decode step the host has not read yet
        self._ids = itertools.count()
        self._rng = np.random.default_rng(econf.seed)
        self._counters = {"steps": 0, "prefill_steps": 0, "decode_steps": 0, "generated_tokens": 0,
                          "prompt_tokens": 0, "finished": 0, "aborted": 0, "host_time_s": 0.0,
                          "step_time_s": 0.0}
        self._host_parts = dict.fromkeys(("inbox", "schedule", "inputs", "outputs"), 0.0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_dir, config: Optional[EngineConfig] = None,
                        weights_cache_dir=None) -> "Engine":
        """Load a Hugging Face checkpoint folder (config.json + *.safetensors [+ tokenizer.json]).

        ``weights_cache_dir``: keep the converted weights there (orbax) so a restart skips the
        safetensors conversion (7B: 23 s -> 3 s on the GPU host, benchmarks/NOTES.md)."""
        from slora_jax.model.checkpoint import Tokenizer, load_params
        from slora_jax.model.hf_config import load_model_config

        econf = config or EngineConfig()
        model_dir = str(Path(model_dir).expanduser())
        mcfg = load_model_config(model_dir)
        if weights_cache_dir is not None:
            from slora_jax.model.weights_cache import load_params_cached
            params = load_params_cached(model_dir, mcfg, econf.dtype, weights_cache_dir)
        else:
            params = load_params(model_dir, mcfg, econf.dtype)
        return cls(mcfg, params, econf, tokenizer=Tokenizer.from_dir(model_dir, mcfg), model_dir=model_dir)

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, adapter_dir, lazy: bool = False) -> AdapterInfo:
        """Register a PEFT LoRA folder under ``name``. Validated now (weights too unless ``lazy``)."""
        return self.adapters.register(name, adapter_dir, lazy=lazy)

    def load_adapter_weights(self, name: str, lora) -> AdapterInfo:
        """Register an adapter already in memory (``slora_jax.adapters.LoraWeights``, e.g. just trained)."""
        return self.adapters.register_weights(name, lora)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (its device pages and host copy are freed). Refused while requests use it."""
        with self._step_lock:
            changed: list[Request] = []
            self._drain_inbox(changed)  # requests queued before the unload count as users
            self._emit(changed)  # aborts drained here still reach their callers
            users = [r.request_id for r in self._requests.values() if r.adapter == name and not r.finished]
            if users and name in self.adapters:
                raise AdapterError(f"adapter {name!r} is used by {len(users)} unfinished request(s)")
            self.adapters.unregister(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.list()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: Prompt, adapter: Optional[str] = None,
                    sampling: Optional[SamplingParams] = None, request_id: Optional[str] = None,
                    listener: Optional[Callable[[RequestOutput], None]] = None) -> str:
        """Validate and queue one request; returns its id. Thread-safe. Raises RequestError & co."""
        req = self._make_request(prompt, adapter, sampling, request_id)
        if listener is not None:
            self._listeners[req.request_id] = listener
            self._streaming.add(req.request_id)
        self._inbox.put(("add", req))
        return req.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request; its pages are freed at the next step. Thread-safe; unknown ids are ignored."""
        self._inbox.put(("abort", request_id))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or not self._inbox.empty() or self._inflight is not None

    def _make_request(self, prompt, adapter, sampling, request_id) -> Request:
        cfg = self.model_config
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise RequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        sampling.validate(cfg.vocab_size)
        tokens = self._tokenize(prompt)
        if adapter is not None:
            if not isinstance(adapter, str):
                raise RequestError(f"adapter must be a name (str) or None, got {type(adapter).__name__}")
            if adapter not in self.adapters:
                self.adapters.info(adapter)  # raises UnknownAdapterError listing what is loaded
        if len(tokens) >= self.max_model_len:
            raise RequestError(f"prompt of {len(tokens)} tokens leaves no room to generate within the "
                               f"context of {self.max_model_len} tokens")
        # A request must be able to finish alone in the pool (everyone else preempted, their adapters
        # evicted); otherwise it would be preempted and recomputed for ever.
        longest = min(len(tokens) + sampling.max_tokens, self.max_model_len)
        need = self.layout.kv_pages_for(longest)
        adapter_pages = 0 if adapter is None else self.adapters.pages_needed(adapter, resident_too=True)
        if need + adapter_pages > self.pool.total_pages:
            raise RequestError(f"a request of up to {longest} tokens needs {need} KV pages"
                               + (f" and adapter {adapter!r} {adapter_pages} pages" if adapter else "")
                               + f"; the pool has {self.pool.total_pages}: lower max_tokens or enlarge the pool")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise CapacityError(f"{len(self.scheduler.waiting)} requests are waiting (max_waiting); retry later")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        seed = sampling.seed if sampling.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        return Request(request_id=str(rid), prompt=tokens, adapter=adapter, sampling=sampling,
                       seed=seed & 0xFFFFFFFF, max_len=self.max_model_len,
                       metrics=RequestMetrics(arrival_time=time.monotonic()))

    def _tokenize(self, prompt) -> list[int]:
        V = self.model_config.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer.json: give prompts as lists of token ids")
            tokens = self.tokenizer.encode(prompt)
        else:
            if isinstance(prompt, np.ndarray):
                prompt = prompt.tolist()
            if not isinstance(prompt, (list, tuple)):
                raise RequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
            tokens = []
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                    raise RequestError(f"token ids must be integers, got {t!r}")
                tokens.append(int(t))
        if not tokens:
            raise RequestError("the prompt is empty")
        bad = [t for t in tokens if not 0 <= t < V]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {V})")
        return tokens

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs of every request that changed."""
        with self._step_lock:
            t0 = time.perf_counter()
            changed: list[Request] = []
            with self._timed("inbox"):
                self._drain_inbox(changed)
            wait0 = self.runner.device_wait_s
            kind = self._finish_inflight(changed)
            if kind is None:
                with self._timed("schedule"):
                    sched = self.scheduler.schedule()
                changed.extend(sched.finished)
                kind = sched.kind
                if kind == "prefill":
                    self._run_prefill(sched)
                    changed.extend(sched.requests)
                elif kind == "decode":
                    self._run_decode(sched.requests, changed)
            if kind != "idle":
                self._counters["steps"] += 1
                self._counters[kind + "_steps"] += 1
            with self._timed("outputs"):
                outs = self._emit(changed)
            dt = time.perf_counter() - t0  # the step's wall time, its outputs' delivery included
            self._counters["step_time_s"] += dt
            self._counters["host_time_s"] += dt - (self.runner.device_wait_s - wait0)
            return outs

    @contextlib.contextmanager
    def _timed(self, part: str):
        """Add the host time of the block to ``stats()["host_breakdown_s"][part]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._host_parts[part] += time.perf_counter() - t0

    def _drain_inbox(self, changed: list) -> None:
        while True:
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                if arg.adapter is not None and arg.adapter not in self.adapters:
                    # Unloaded between add_request and now: fail this request only.
                    self._requests[arg.request_id] = arg
                    arg.status = Status.FINISHED
                    arg.finish_reason, arg.error = "abort", f"adapter {arg.adapter!r} was unloaded"
                    arg.metrics.finish_time = time.monotonic()
                    changed.append(arg)
                    continue
                self._requests[arg.request_id] = arg
                self._counters["prompt_tokens"] += len(arg.prompt)
                self.scheduler.add(arg)
            else:
                req = self.scheduler.abort(arg)
                if req is not None:
                    changed.append(req)

    def _emit(self, changed: list[Request]) -> list[RequestOutput]:
        outs = []
        seen = set()
        for req in changed:
            if req.request_id in seen or (not req.finished and req.request_id in self._finish_only):
                continue  # generate() reads finished outputs only: no per-step snapshot for it
            seen.add(req.request_id)
            # Detokenising every running request every step would cost more than the step itself at
            # large batches: text is made for finished requests and for streams that asked for it.
            wants_text = req.finished or req.request_id in self._streaming
            text = self.tokenizer.decode(req.output) if self.tokenizer is not None and wants_text else None
            out = req.to_output(text)
            outs.append(out)
            if req.finished:
                self._counters["finished"] += 1
                if req.finish_reason == "abort":
                    self._counters["aborted"] += 1
                self._requests.pop(req.request_id, None)
            listener = self._listeners.get(req.request_id)
            if listener is not None:
                if req.finished:
                    del self._listeners[req.request_id]
                    self._streaming.discard(req.request_id)
                    self._finish_only.discard(req.request_id)
                listener(out)
        return outs

    def _by_adapter(self, reqs: list[Request]) -> list[Request]:
        """Requests of one adapter side by side (stable): prefill LoRA works per segment of equal slots."""
        return [reqs[i] for i in np.argsort(self._slots(reqs), kind="stable")]

    def _slots(self, reqs: list[Request]) -> np.ndarray:
        """Device slot of each request's adapter (-1: base), one store lookup per distinct adapter."""
        by_name = {None: -1}
        for name in {r.adapter for r in reqs} - {None}:
            by_name[name] = self.adapters.slot_of(name)
        return np.fromiter((by_name[r.adapter] for r in reqs), np.int32, len(reqs))

    def _sampling_arrays(self, reqs: list[Request], n: int, ahead: int = 0) -> dict:
        pad = n - len(reqs)
        sp = [r.sampling for r in reqs]
        return dict(
            temperature=np.pad(np.array([s.temperature for s in sp], np.float32), (0, pad)),
            top_p=np.pad(np.array([s.top_p for s in sp], np.float32), (0, pad), constant_values=1.0),
            top_k=np.pad(np.array([s.top_k for s in sp], np.int32), (0, pad)),
            seeds=np.pad(np.array([r.seed for r in reqs], np.uint32), (0, pad)),
            counters=np.pad(np.array([len(r.output) + ahead for r in reqs], np.int32), (0, pad)),
        )

    def _prefill_rows(self, T: int) -> int:
        """Rows of ``last_index`` (and of sampling) in a prefill of T tokens: a function of T alone, so each
        token bucket is one program. A prefill holds at most T and at most max_batch_size requests."""
        return min(T, bucket(self.config.max_batch_size))

    @staticmethod
    def _prefill_arrays(T: int, rows: int) -> dict:
        return dict(tokens=np.zeros(T, np.int32), positions=np.zeros(T, np.int32),
                    token_slot=np.full(T, -1, np.int32), segment_ids=np.full(T, -1, np.int32),
                    k_rows=np.full(T, -1, np.int32), v_rows=np.full(T, -1, np.int32),
                    last_index=np.zeros(rows, np.int32))

    def _prefill_inputs(self, reqs: list[Request], write_kv: bool = True) -> dict:
        R = self.layout.page_rows
        T = bucket(sum(r.context_len for r in reqs), 16)
        inp = self._prefill_arrays(T, max(self._prefill_rows(T), bucket(len(reqs))))
        tokens, positions, slot, seg = inp["tokens"], inp["positions"], inp["token_slot"], inp["segment_ids"]
        k_rows, v_rows, last = inp["k_rows"], inp["v_rows"], inp["last_index"]
        slots = self._slots(reqs)
        off = 0
        for i, r in enumerate(reqs):
            n = r.context_len
            sl = slice(off, off + n)
            tokens[sl] = r.context
            pos = np.arange(n, dtype=np.int32)
            positions[sl] = pos
            slot[sl] = slots[i]
            seg[sl] = i
            if write_kv:
                k_rows[sl] = r.k_pages[pos // R] * R + pos % R
                v_rows[sl] = r.v_pages[pos // R] * R + pos % R
            last[i] = off + n - 1
            off += n
        return inp

    def _run_prefill(self, sched: SchedulerOutput) -> None:
        with self._timed("inputs"):
            reqs = self._by_adapter(sched.requests)
            inp = self._prefill_inputs(reqs)
            samp = self._sampling_arrays(reqs, len(inp["last_index"]))
        tokens, logp = self.runner.run("prefill", self.tables, inp, samp)
        with self._timed("outputs"):
            self._append(reqs, tokens, logp)

    def _run_decode(self, reqs: list[Request], changed: list) -> None:
        out = self._dispatch_decode(reqs)
        if self.config.async_scheduling:
            self._inflight = (out, reqs)  # read at the next step, after the step after it is queued
            return
        tokens, logp = self.runner.collect(out)
        with self._timed("outputs"):
            self._append(reqs, tokens, logp)
        changed.extend(reqs)

    def _finish_inflight(self, changed: list) -> Optional[str]:
        """Read the decode step still on the device. When the batch can go on as it is (nobody waits to
        be admitted, pages for one more token fit), first queue the next decode step, fed by the tokens
        still on the device, so that this step's host work overlaps the device's work on the next.
        Returns "decode" when it queued that step, None when the scheduler must decide."""
        if self._inflight is None:
            return None
        out, reqs = self._inflight
        self._inflight = None
        nxt = None
        # Go on without a scheduling decision when nobody could be admitted anyway: the queue is empty,
        # or the batch is full (a slot freed by this step is taken one step later).
        sched = self.scheduler
        if not sched.waiting or len(sched.running) >= self.config.max_batch_size:
            # Rows that finish by length on the tokens being read would be wasted: leave them out.
            going = [r for r in reqs if r.status is Status.RUNNING and len(r.output) + 1 < r.sampling.max_tokens
                     and r.context_len + 1 < r.max_len]
            if going and all(self.scheduler.ensure_kv(r, r.context_len + 1) for r in going):
                row = {id(r): i for i, r in enumerate(reqs)}
                prev_rows = np.fromiter((row[id(r)] for r in going), np.int32, len(going))
                nxt = (self._dispatch_decode(going, ahead=1, prev=(out[0], prev_rows)), going)
        tokens, logp = self.runner.collect(out)
        with self._timed("outputs"):
            self._append(reqs, tokens, logp)
        changed.extend(reqs)
        if nxt is None:
            return None
        with self._timed("schedule"):
            changed.extend(sched.tick())
        self._inflight = nxt
        return "decode"

    def _dispatch_decode(self, reqs: list[Request], ahead: int = 0, prev=None):
        """Queue a decode step for ``reqs``. ``ahead`` = 1: each request's newest token is still on the
        device (``prev`` = (device tokens, row of each request there)); positions move one further."""
        with self._timed("inputs"):
            inp, samp = self._decode_inputs(reqs, ahead, prev)
        return self.runner.dispatch("decode", self.tables, inp, samp, prev_tokens=None if prev is None else prev[0])

    def _decode_inputs(self, reqs: list[Request], ahead: int, prev) -> tuple[dict, dict]:
        R = self.layout.page_rows
        n = len(reqs)
        # At least 2 rows: XLA turns a one-row scatter into a dynamic-update-slice, which it then
        # protects with a full copy of the pool (seen in the compiled HLO); a padded row avoids it.
        B = bucket(n, 2)
        inp = self._decode_arrays(B, self._decode_width(max(len(r.k_pages) for r in reqs)))
        pos = np.fromiter((r.context_len - 1 + ahead for r in reqs), np.int32, n)
        k_pages, v_pages = inp["k_pages"], inp["v_pages"]
        for i, r in enumerate(reqs):
            k_pages[i, :len(r.k_pages)] = r.k_pages
            v_pages[i, :len(r.v_pages)] = r.v_pages
        rows = np.arange(n)
        if prev is None:
            inp["tokens"][:n] = np.fromiter((r.output[-1] for r in reqs), np.int32, n)
        else:
            inp["prev_rows"][:n] = prev[1]
        inp["positions"][:n] = pos
        inp["token_slot"][:n] = self._slots(reqs)
        inp["k_rows"][:n] = k_pages[rows, pos // R] * R + pos % R
        inp["v_rows"][:n] = v_pages[rows, pos // R] * R + pos % R
        inp["lengths"][:n] = pos + 1
        return inp, self._sampling_arrays(reqs, B, ahead)

    def _decode_width(self, pages: int) -> int:
        """Page-table columns of a decode step holding at most ``pages`` pages per request. The Pallas
        kernel reads only each row's own pages, so its table always has room for the longest request the
        engine allows (one program per batch bucket); the XLA path gathers every column, so its width
        follows the longest context (bucketed)."""
        if self.kernel_backend == "pallas":
            return max(self._max_pages, pages)
        return bucket(pages, 4)

    @staticmethod
    def _decode_arrays(B: int, width: int) -> dict:
        return dict(tokens=np.zeros(B, np.int32), prev_rows=np.full(B, -1, np.int32),
                    positions=np.zeros(B, np.int32), token_slot=np.full(B, -1, np.int32),
                    k_rows=np.full(B, -1, np.int32), v_rows=np.full(B, -1, np.int32),
                    k_pages=np.zeros((B, width), np.int32), v_pages=np.zeros((B, width), np.int32),
                    lengths=np.zeros(B, np.int32))

    def step_shapes(self) -> list[tuple[str, int, int]]:
        """Every (mode, tokens or batch rows, page-table width) a step of this engine can take: the bounded
        set of programs it compiles (prefill: token buckets up to the longest prompt it may run in one
        step; decode: batch buckets x table widths)."""
        longest = max(self.config.max_prefill_tokens, self.max_model_len - 1)
        prefill = [("prefill", T, 0) for T in _powers(16, bucket(longest, 16))]
        widths = sorted({self._decode_width(p) for p in range(1, self._max_pages + 1)})
        decode = [("decode", B, w) for B in _powers(2, bucket(self.config.max_batch_size, 2)) for w in widths]
        return prefill + decode

    def precompile(self, sampling: bool = True, max_workers: Optional[int] = None,
                   on_compiled: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Compile every step program the engine can run (``step_shapes``) before serving, so no request
        waits for a compilation (a 7B step program takes tens of seconds to compile on the GPU). Programs
        compile in parallel threads. ``sampling``: also the programs for temperature > 0 (greedy-only
        batches use their own). Returns one record per program compiled now (shape, seconds)."""
        steps = []
        for temp in ((0.0, 1.0) if sampling else (0.0,)):
            for mode, n, width in self.step_shapes():
                if mode == "prefill":
                    inp = self._prefill_arrays(n, self._prefill_rows(n))
                    samp = self._sampling_arrays([], len(inp["last_index"]))
                else:
                    inp = self._decode_arrays(n, width)
                    samp = self._sampling_arrays([], n)
                samp["temperature"][:] = temp
                steps.append((mode, inp, samp, dict(mode=mode, size=n, width=width, greedy=temp == 0.0)))
        with self._step_lock:
            return self.runner.precompile(self.tables, steps, max_workers, on_compiled)

    def _append(self, reqs: list[Request], tokens: np.ndarray, logp: np.ndarray) -> None:
        now = time.monotonic()
        eos = set(self.model_config.eos_token_ids)
        for i, r in enumerate(reqs):
            if r.status is not Status.RUNNING:
                continue  # finished or aborted while its step was on the device: the row is dropped
            t = int(tokens[i])
            r.output.append(t)
            r.logprobs.append(float(logp[i]))
            self._counters["generated_tokens"] += 1
            if r.metrics.first_token_time is None:
                r.metrics.first_token_time = now
            sp = r.sampling
            if t in sp.stop_token_ids or (not sp.ignore_eos and t in eos):
                self.scheduler.finish(r, "stop")
            elif len(r.output) >= sp.max_tokens or r.context_len >= r.max_len:
                self.scheduler.finish(r, "length")

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: Sequence[Prompt], adapters=None, sampling=None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            raise RequestError("prompts must be a list of prompts (each a string or a list of token ids)")
        n = len(prompts)
        adapters = _per_prompt(adapters, n, "adapters")
        samplings = _per_prompt(sampling, n, "sampling")
        results: dict[str, RequestOutput] = {}
        done = threading.Event()

        def collect(out: RequestOutput):
            if out.finished:
                results[out.request_id] = out
                if len(results) == n:
                    done.set()

        reqs = [self._make_request(p, a, s, None) for p, a, s in zip(prompts, adapters, samplings)]
        ids = [r.request_id for r in reqs]
        for r in reqs:  # validated all first: a bad prompt queues nothing
            self._listeners[r.request_id] = collect
            self._finish_only.add(r.request_id)
            self._inbox.put(("add", r))
        bar = _progress(n) if use_tqdm else None
        while not done.is_set() and n:
            self.step()
            if bar is not None:
                bar.n = len(results)
                bar.refresh()
        if bar is not None:
            bar.close()
        return [results[i] for i in ids]

    def stream(self, prompt: Prompt, adapter: Optional[str] = None,
               sampling: Optional[SamplingParams] = None) -> Iterator[RequestOutput]:
        """Yield the request's cumulative output after every step that changed it; the last is finished."""
        pending: "queue.SimpleQueue[RequestOutput]" = queue.SimpleQueue()
        rid = self.add_request(prompt, adapter, sampling, listener=pending.put)
        try:
            while True:
                while pending.empty():
                    self.step()
                out = pending.get()
                yield out
                if out.finished:
                    return
        finally:
            if rid in self._listeners or rid in self._requests:
                self.abort(rid)
                self._listeners.pop(rid, None)
                self._streaming.discard(rid)

    def logits(self, prompts: Sequence[Sequence[int]], adapters=None) -> list[np.ndarray]:
        """Float32 logits [len, V] of every position of every prompt (scoring; nothing is cached)."""
        n = len(prompts)
        adapters = _per_prompt(adapters, n, "adapters")
        with self._step_lock:
            reqs = [self._make_request(p, a, None, None) for p, a in zip(prompts, adapters)]
            held = []
            try:
                for r in reqs:
                    if r.adapter is not None and r.adapter not in held:
                        if not self.adapters.acquire(r.adapter):
                            raise CapacityError(f"no room on the device for adapter {r.adapter!r} right now")
                        held.append(r.adapter)
                reqs_sorted = self._by_adapter(reqs)
                inp = self._prefill_inputs(reqs_sorted, write_kv=False)
                samp = self._sampling_arrays(reqs_sorted, len(inp["last_index"]))
                logits = self.runner.run("prefill", self.tables, inp, samp, all_logits=True)
            finally:
                for a in held:
                    self.adapters.release(a)
            out, off = {}, 0
            for r in reqs_sorted:
                out[r.request_id] = logits[off:off + r.context_len]
                off += r.context_len
            return [out[r.request_id] for r in reqs]

    def stats(self) -> dict:
        s = dict(self.pool.stats())
        s.update(
            adapters_registered=len(self.adapters.names()),
            adapters_on_device=len(self.adapters.resident_names()),
            adapter_host_bytes=self.adapters.host_bytes,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            compiled_shapes=len(self.runner.compiled_shapes),
            preemptions=self.scheduler.num_preemptions,
            kernel_backend=self.kernel_backend,
            **{f"adapter_{k}": v for k, v in self.adapters.counters.items()},
            **self._counters,
        )
        s["host_overhead_share"] = s["host_time_s"] / s["step_time_s"] if s["step_time_s"] else 0.0
        # Where the host time goes: building inputs, queuing programs (dispatch, with the input transfer),
        # scheduling (with adapter loads and prefetch), reading outputs; "other" is the rest of step().
        parts = dict(self._host_parts, dispatch=self.runner.dispatch_s)
        parts["other"] = max(s["host_time_s"] - sum(parts.values()), 0.0)
        s["host_breakdown_s"] = parts
        s["dispatch_breakdown_s"] = dict(self.runner.dispatch_parts)  # pack + tables + launch = dispatch
        return s


def _powers(lo: int, hi: int) -> list[int]:
    """Powers of two from lo to hi (both powers of two)."""
    out = [lo]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return out


def _per_prompt(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise RequestError(f"{what} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def _progress(n: int):
    from tqdm.auto import tqdm
    return tqdm(total=n, desc="generate", unit="req")


def _pinned_host(device):
    """numpy -> pinned host memory (fast, asynchronous uploads); plain numpy where unsupported."""
    try:
        sharding = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    except Exception:  # memory kinds unsupported on this backend
        return lambda x: x

    def put(x):
        try:
            return jax.device_put(x, sharding)
        except Exception:
            return x
    return put
