"""Engine: the public entry point. Requests in, tokens out, over one base model and many adapters.

The loop is vLLM v1's, split along its seams: ``core.EngineCore`` (schedule -> run -> update, the host
one step ahead of the device), ``inputs.StepInputs`` (device inputs from a schedule) and
``outputs.OutputProcessor`` (append, finish, emit). This module is the public API. ``add_request`` and
``abort`` are thread-safe (they go through an inbox drained at the start of a step), so a server thread
can feed the engine while another thread drives ``step()``. One engine may span the devices of several
processes (``EngineConfig.distributed_coordinator``): ``multihost`` says how they agree on every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import jax
import numpy as np

import pallas_kernels as pk
from sharding import (TensorParallelError, TensorParallelLayout, initialize, is_multiprocess, make_mesh, put,
                      smallest)
from slora_jax.adapters.paging import AdapterTables
from slora_jax.adapters.store import AdapterStore
from slora_jax.config import EngineConfig, ModelConfig
from slora_jax.engine.core import EngineCore
from slora_jax.engine.inputs import StepInputs, bucket
from slora_jax.engine.multihost import SharedInbox
from slora_jax.engine.outputs import OutputProcessor
from slora_jax.engine.request import Request
from slora_jax.engine.runner import DTYPES, ModelRunner
from slora_jax.engine.scheduler import Scheduler
from slora_jax.errors import (AdapterError, CapacityError, ConfigError, ProcessMismatchError, RequestError,
                              SloraError)
from slora_jax.memory import pinned as pinned_host
from slora_jax.memory.pool import PoolLayout, UnifiedPagePool
from slora_jax.model.llama import LORA_ONE_BLOCK, LORA_TILES
from slora_jax.types import AdapterInfo, RequestMetrics, RequestOutput, SamplingParams

Prompt = Union[str, Sequence[int]]
_log = logging.getLogger("slora_jax.engine")


_ENGINES = itertools.count()  # engines built in this process: names each one's channel, the same on every process


def join_job(econf: EngineConfig) -> None:
    """Join the job of several processes that ``econf`` names, if any (before anything touches a device)."""
    if econf.distributed_coordinator is None:
        return
    try:
        initialize(econf.distributed_coordinator, econf.num_processes, econf.process_id)
    except ValueError as e:  # the values were checked by EngineConfig: the process cannot join now
        raise ConfigError(str(e)) from None


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
        join_job(econf)
        econf = dataclasses.replace(econf, dtype=econf.resolved_dtype(jax.default_backend()),
                                    adapter_readers=econf.resolved_readers(jax.default_backend()))
        if econf.compile_cache_dir is not None:
            from slora_jax.compile_cache import enable_compilation_cache
            enable_compilation_cache(econf.compile_cache_dir)  # before anything compiles
        tp = econf.tensor_parallel
        multi = is_multiprocess()
        if tp > len(jax.devices()):
            raise ConfigError(f"tensor_parallel={tp} but only {len(jax.devices())} device(s) are visible")
        try:  # heads, KV heads (split or replicated) and MLP columns must split evenly
            tp_layout = TensorParallelLayout(model_config, tp)
        except TensorParallelError as e:
            raise ConfigError(str(e)) from None
        if multi and tp != jax.device_count():
            # A mesh of fewer devices would leave some processes without a shard to compute.
            raise ConfigError(f"with {jax.process_count()} processes the mesh spans every process's devices: "
                              f"tensor_parallel must be {jax.device_count()} (their total), got {tp}")
        if multi and econf.prefetch:
            # Prefetch decides by when a read or a copy finishes, which differs between processes (multihost.py).
            _log.info("adapter prefetch is off: with several processes adapters load when their request is admitted")
            econf = dataclasses.replace(econf, prefetch=False)
        mesh = make_mesh(tp) if tp > 1 else None
        self.model_config = model_config
        self.config = econf
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.max_model_len = econf.max_model_len or model_config.max_position_embeddings
        device = jax.local_devices()[0]  # this process's first device (jax.devices() lists every process's)
        backend = econf.kernel_backend
        if backend == "auto":
            backend = "pallas" if _on_gpu() else "xla"
        if backend == "pallas" and pk.pool_storage.storage_dtype(DTYPES[econf.dtype]) == pk.pool_storage.BITS:
            _log.warning("kernel_backend='pallas' with a %s pool on %s: the pool is stored as uint16 bits there, "
                         "which the Pallas kernels do not read; every op runs on the XLA path",
                         econf.dtype, jax.default_backend())
            backend = "xla"
        self.kernel_backend = backend
        # Weights go on the device first so that the pool is sized from the memory really left.
        self.runner = ModelRunner(model_config, econf, params, self._op_backend(model_config, econf, backend),
                                  device, mesh)
        # The pool's width is the K/V width (of every device's KV heads, when they are replicated).
        unit = PoolLayout(model_config.num_layers, 1, econf.page_rows, tp_layout.pool_width, shards=tp)
        pages = _pool_pages(model_config, econf, unit, device, shards=tp)
        if multi:  # one pool over every process: the page count that fits in each one's free memory
            pages = smallest(pages)
        self.layout = dataclasses.replace(unit, num_pages=pages)
        self.runner.allocate_pool(self.layout)
        self.pool = UnifiedPagePool(self.layout)
        self._max_pages = -(-self.max_model_len // econf.page_rows)  # KV pages of the longest request
        self.tables = AdapterTables(model_config, self.layout, econf.max_adapters_on_device, econf.max_lora_rank)
        # Several processes build tiles spanning every process's devices from host numpy (sharding.put).
        pinned = pinned_host.to_pinned_host(device) if _on_gpu() and not multi else None
        pin = pinned is not None and econf.pin_host_cache
        arena = pinned_host.host_arena(econf.host_cache_bytes, device if pin else None)
        self._pinned_reserved = (0, 0.0)  # (bytes, seconds) of pinned host memory taken when built
        if pin and (arena is None or not arena.registered):
            self._pinned_reserved = pinned_host.reserve(pinned, pinned_host.reservation_bytes(econf.host_cache_bytes))
            _log.info("pinned %.1f GiB of host memory for the adapter host tier in %.1f s",
                      self._pinned_reserved[0] / (1 << 30), self._pinned_reserved[1])
        self._arena_info = (0 if arena is None else arena.size, bool(arena is not None and arena.registered),
                            0.0 if arena is None else arena.register_s)
        to_host = _or_numpy(pinned) if pinned is not None else (lambda x: x)
        stage = None if mesh is None else (lambda tiles: put(tiles, self.runner.replicated))
        self.adapters = AdapterStore(model_config, econf, self.layout, self.pool, self.tables,
                                     self.runner.write_pages, DTYPES[econf.dtype], to_host, stage, arena=arena)
        self.scheduler = Scheduler(econf, self.pool, self.adapters)
        self._inputs = StepInputs(econf.page_rows, econf.max_batch_size, self.scheduler.token_budget,
                                  self._table_width, self._slots)
        self._outputs = OutputProcessor(tokenizer, model_config.eos_token_ids, self.scheduler.finish)
        self._shared = SharedInbox(f"engine{next(_ENGINES)}") if multi else None
        self._core = EngineCore(self.runner, self.scheduler, self.adapters, self.tables, self._inputs,
                                self._outputs, econf.async_scheduling, self._shared, lora_tiles=self._lora_tiles(),
                                one_block_rank=self.layout.page_rows if self._lora_one_block() else 0)
        self._step_lock = threading.RLock()
        self._ids = itertools.count()
        self._closed = False
        self._rng = np.random.default_rng(econf.seed)

    @staticmethod
    def _op_backend(cfg: ModelConfig, econf: EngineConfig, backend: str) -> str:
        """The kernel choice the step programs get: ``backend``, or "auto" (each op on Pallas where its kernel
        takes the model's shapes, XLA elsewhere) when Pallas was chosen automatically and some kernel cannot.
        An explicit "pallas" that cannot run every op is refused here, not in the first step."""
        if backend != "pallas":
            return backend
        bad = pk.unsupported_ops(head_dim=cfg.head_dim, num_q_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                 page_rows=econf.page_rows, tensor_parallel=econf.tensor_parallel,
                                 page_width=TensorParallelLayout(cfg, econf.tensor_parallel).pool_width)
        if not bad:
            return backend
        why = "; ".join(f"{op}: {reason}" for op, reason in bad.items())
        if econf.kernel_backend == "pallas":
            raise ConfigError(f"kernel_backend='pallas' cannot run this model ({why}); use 'auto' (XLA for "
                              f"these ops) or 'xla'")
        _log.warning("these ops run on the XLA path, their Pallas kernels cannot take this model: %s", why)
        return "auto"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_dir, config: Optional[EngineConfig] = None,
                        weights_cache_dir=None) -> "Engine":
        """Load a Hugging Face checkpoint folder (config.json + *.safetensors [+ tokenizer.json]).

        The safetensors are memory-mapped and each layer is put on the device (or the mesh) by a pool of
        threads, fused (q|k|v, gate|up) and cast there. ``weights_cache_dir``: keep that fused layout there
        (orbax), restored straight onto the device at the next start."""
        from slora_jax.model.checkpoint import Tokenizer
        from slora_jax.model.device_load import load_fused_params
        from slora_jax.model.hf_config import load_model_config

        econf = config or EngineConfig()
        join_job(econf)  # before jax.default_backend() touches a device
        backend = jax.default_backend()
        econf = dataclasses.replace(econf, dtype=econf.resolved_dtype(backend))
        if econf.compile_cache_dir is not None:
            from slora_jax.compile_cache import enable_compilation_cache
            enable_compilation_cache(econf.compile_cache_dir)
        model_dir = str(Path(model_dir).expanduser())
        mcfg = load_model_config(model_dir)
        tp = econf.tensor_parallel
        mesh = make_mesh(tp) if 1 < tp <= len(jax.devices()) else None
        where = dict(scan_layers=econf.resolved_scan_layers(backend), mesh=mesh)
        if weights_cache_dir is not None:
            from slora_jax.model.weights_cache import load_fused_params_cached
            params = load_fused_params_cached(model_dir, mcfg, econf.dtype, weights_cache_dir, **where)
        else:
            params = load_fused_params(model_dir, mcfg, econf.dtype, **where)
        return cls(mcfg, params, econf, tokenizer=Tokenizer.from_dir(model_dir, mcfg), model_dir=model_dir)

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, adapter_dir, lazy: bool = False) -> AdapterInfo:
        """Register a PEFT LoRA folder under ``name``. Validated now (weights too unless ``lazy``).

        Several processes: every process reads the folder at ``adapter_dir`` (the same files on each host)."""
        # With several processes, between two steps: the adapters registered choose the step programs.
        with self._step_lock if self._shared is not None else contextlib.nullcontext():
            info = self.adapters.register(name, adapter_dir, lazy=lazy)
            self._core.agree("load", (name, str(adapter_dir), bool(lazy)))
            self._core.adapters_changed()
        return info

    def load_adapter_weights(self, name: str, lora) -> AdapterInfo:
        """Register an adapter already in memory (``slora_jax.adapters.LoraWeights``, e.g. just trained)."""
        with self._step_lock if self._shared is not None else contextlib.nullcontext():
            info = self.adapters.register_weights(name, lora)
            self._core.agree("load_weights", name)  # not replayed by follow(): the weights are this process's
            self._core.adapters_changed()
        return info

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (its device pages and host copy are freed). Refused while requests use it."""
        with self._step_lock:
            changed: list[Request] = []
            name = self._core.drain_inbox(changed, "unload", name)  # requests queued before count as users
            self._core.drain(changed)  # the step on the device may still read its pages
            self._outputs.emit(changed)  # aborts drained here still reach their callers
            users = [r.request_id for r in self._core.requests.values() if r.adapter == name and not r.finished]
            if users and name in self.adapters:
                raise AdapterError(f"adapter {name!r} is used by {len(users)} unfinished request(s)")
            self.adapters.unregister(name)
            self._core.adapters_changed()

    def adapter_names(self) -> list[str]:
        """Names of every registered adapter (cheap: no per-adapter record is built)."""
        return self.adapters.names()

    def has_adapter(self, name: str) -> bool:
        return name in self.adapters

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.list()

    def evict_adapters(self) -> None:
        """Drop every adapter from the device (host copies stay): the next use of each loads it again."""
        with self._step_lock:
            self._core.agree("evict")
            self.adapters.evict_all()

    def adapter_load_count(self) -> int:
        """Adapter uploads to the device so far (a mark for ``adapter_load_summary``)."""
        return self.adapters.load_count

    def adapter_load_summary(self, since: int = 0) -> dict:
        """How the adapter uploads after mark ``since`` went: counts, bytes, how many were hidden by prefetch."""
        return self.adapters.load_summary(since)

    def set_scheduler(self, name: str, **options) -> None:
        """Use another scheduling policy (fcfs | cluster | slo | fair) from now on; only while nothing runs."""
        from slora_jax.engine.policies import make_policy
        with self._step_lock:
            name, options = self._core.agree("policy", (name, options))
            self.scheduler.set_policy(make_policy(dataclasses.replace(self.config, scheduler=name, **options)))

    def base_params(self):
        """The base model's weights as the step programs read them (fused q|k|v and gate|up)."""
        return self.runner.params

    def replace_base_params(self, params) -> None:
        """Serve with other base weights of the same layout (e.g. an adapter merged in); nothing in flight."""
        with self._step_lock:
            self._core.agree("params")  # not replayed by follow(): the weights are this process's
            changed: list[Request] = []
            self._core.drain(changed)
            self._outputs.emit(changed)
            self.runner.params = params

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: Prompt, adapter: Optional[str] = None,
                    sampling: Optional[SamplingParams] = None, request_id: Optional[str] = None,
                    listener: Optional[Callable[[RequestOutput], None]] = None) -> str:
        """Validate and queue one request; returns its id. Thread-safe. Raises RequestError & co."""
        self._check_open()
        req = self._make_request(prompt, adapter, sampling, request_id)
        if listener is not None:
            self._outputs.listen(req.request_id, listener, stream=True)
        self._core.inbox.put(("add", req))
        return req.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request; its pages are freed at the next step. Thread-safe; unknown ids are ignored."""
        self._core.inbox.put(("abort", request_id))

    def has_unfinished(self) -> bool:
        return self._core.has_unfinished()

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
        # Several processes: the same ids on every process (multihost.SharedInbox).
        suffix = uuid.uuid4().hex[:6] if self._shared is None else self._shared.id_suffix
        rid = request_id if request_id is not None else f"req-{next(self._ids)}-{suffix}"
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
        """Run one iteration: queue the next step on the device, then read the one before it. Returns the
        outputs of every request that changed."""
        with self._step_lock:
            self._check_open()
            return self._core.step()

    def close(self) -> None:
        """Give the device memory back (weights, page pool, compiled programs) and stop the adapter reader
        threads, so another engine can be built in this process. Requests still running are aborted;
        the engine takes no more. Idempotent."""
        with self._step_lock:
            if self._closed:
                return
            changed: list[Request] = []
            self._core.drain_inbox(changed, "close")
            self._core.drain(changed)
            for rid in [r.request_id for r in self._core.requests.values() if not r.finished]:
                self._core.inbox.put(("abort", rid))
            self._core.drain_inbox(changed, "close")
            self._outputs.emit(changed)
            self._closed = True
            self.adapters.close()
            self.runner.release()

    def _check_open(self) -> None:
        if self._closed:
            raise RequestError("this engine is closed (Engine.close): build a new one")

    def follow(self) -> None:
        """Processes other than 0 of a multi-process engine that serves (only process 0 takes requests): make
        process 0's Engine calls (steps, adapter loads and unloads, scoring) as it makes them, until it calls
        ``stop_followers``. Every process must see the same adapter files at the same paths."""
        if self._shared is None or self._shared.is_source:
            raise ProcessMismatchError("Engine.follow() is for processes other than 0 of a multi-process engine")
        replay = {"step": lambda args: self.step(), "load": lambda args: self.load_adapter(*args),
                  "unload": self.unload_adapter, "evict": lambda args: self.evict_adapters(),
                  "policy": lambda args: self.set_scheduler(args[0], **args[1]),
                  "logits": lambda args: self.logits(*args), "close": lambda args: self.close()}
        while True:
            kind, args = self._shared.peek()
            if kind == "stop":
                self._shared.skip()
                break
            if kind not in replay:
                raise ProcessMismatchError(f"process 0 made a {kind!r} call, which a following process cannot make "
                                           "with process 0's arguments; make that call on every process instead")
            try:
                replay[kind](args)
            except ProcessMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - sorted below
                # Process 0 sends a call before the part of it that can fail on the user's input (a load once it
                # succeeded there): such an error here is the one process 0 answered, and it serves on.
                user_error = isinstance(e, SloraError) or (kind == "policy" and isinstance(e, RuntimeError))
                if kind == "load" and user_error:
                    raise ProcessMismatchError(f"process 0 loaded adapter {args[0]!r} from {args[1]}, which failed "
                                               f"here: {e}") from e
                if kind == "step" or not user_error:
                    raise  # a failed step ends process 0's serving too
                _log.info("process 0's %s call failed here too: %s", kind, e)
        with self._step_lock:
            self._core.drain([])  # process 0 read its last step before it stopped us: so do we

    def stop_followers(self) -> None:
        """Process 0 of a multi-process engine: end the other processes' ``follow()`` (at shutdown). Does
        nothing in a single-process engine."""
        if self._shared is None:
            return
        if not self._shared.is_source:
            raise ProcessMismatchError("Engine.stop_followers() is for process 0; the others run Engine.follow()")
        with self._step_lock:
            changed: list[Request] = []
            self._core.drain(changed)
            self._outputs.emit(changed)
            self._shared.stop()

    def _slots(self, names) -> np.ndarray:
        """Device slot of each adapter name (-1: base), one store lookup per distinct adapter."""
        by_name = {None: -1}
        for name in set(names) - {None}:
            by_name[name] = self.adapters.slot_of(name)
        return np.fromiter((by_name[n] for n in names), np.int32, len(names))

    def _table_width(self, pages: int) -> int:
        """Page-table columns of a step holding at most ``pages`` pages per request. The Pallas kernels read
        only each row's own pages, so their table always has room for the longest request the engine allows
        (one program per bucket); the XLA path gathers every column, so its width follows the longest
        context (bucketed)."""
        if self.kernel_backend == "pallas":
            return max(self._max_pages, pages)
        return bucket(pages, 4)

    def record_steps(self, on: bool = True) -> list:
        """Start (or stop) keeping one record per queued step: mode, tokens, decode and prompt tokens, keys
        attended, K/V rows read, rows sampled, adapters and LoRA groups. Returns the list it appends to
        (benchmarks compute the floor of the work that really ran from it)."""
        self._core.trace = [] if on else None
        return self._core.trace

    def step_shapes(self) -> list[tuple[str, int, int]]:
        """Every (mode, rows or tokens, page-table width) a step of this engine can take: the bounded set of
        programs it compiles (decode: batch buckets; mixed: token buckets up to the step's token budget)."""
        return self._inputs.shapes(self._max_pages)

    def lora_variants(self) -> list[tuple]:
        """LoRA groups of the step programs: none, those the registered adapters target together, and those with
        MBGMV's tile kernels (LORA_TILES: decode steps of many tokens on few adapters), and each of those two for
        steps whose adapters all fit one rank block (LORA_ONE_BLOCK)."""
        union = self._core.registered_groups()
        if not union:
            return [()]
        with_lora = [union] + ([union + (LORA_TILES,)] if self._lora_tiles() else [])
        return [()] + with_lora + ([g + (LORA_ONE_BLOCK,) for g in with_lora] if self._lora_one_block() else [])

    def step_programs(self) -> list[tuple[tuple, str, int, int]]:
        """(LoRA variant, mode, size, page-table width) of every step program this engine can run (each in a greedy
        and a sampling form): ``step_shapes`` x ``lora_variants``, the tiles variant for the decode sizes that can
        pick it only (``pallas_kernels.lora_decode_may_tile``)."""
        return [(groups, mode, n, width) for groups in self.lora_variants() for mode, n, width in self.step_shapes()
                if LORA_TILES not in groups or (mode == "decode" and pk.lora_decode_may_tile(n))]

    def _lora_one_block(self) -> bool:
        """Whether steps whose adapters all fit one rank block run programs compiled for one: asked for, LoRA on the
        Pallas kernels (the XLA path gains nothing from it), and a pool with more than one rank block."""
        return (self.config.lora_one_block_programs and self.kernel_backend == "pallas"
                and self.config.max_rank_blocks > 1)

    def _lora_tiles(self) -> bool:
        """Whether decode steps may run MBGMV's tile kernels: asked for, LoRA on the Pallas kernels, and a pool the
        tile kernels take (elsewhere that grouping would run the per-token kernels: programs compiled for nothing)."""
        lay = self.layout
        return (self.config.lora_decode_tiles and self.kernel_backend == "pallas"
                and pk.lora_tiles_unsupported(page_rows=lay.page_rows, page_width=lay.page_width,
                                              tensor_parallel=lay.shards) is None)

    def lower_step(self, mode: str, size: int, width: Optional[int] = None, lora_groups: Optional[tuple] = None):
        """The step program of one of ``step_shapes`` (mode "decode": ``size`` rows; "mixed": ``size``
        tokens), lowered for inspection: ``.as_text()``, or ``.compile()`` for the HLO after XLA's passes
        (its collectives, its memory). ``width``: page-table width (default the widest); ``lora_groups``:
        default those of the registered adapters."""
        shapes = [s for s in self.step_shapes() if s[0] == mode and s[1] == size]
        if not shapes:
            raise RequestError(f"no {mode} step of size {size}; the step shapes are {self.step_shapes()}")
        width = max(s[2] for s in shapes) if width is None else width
        inp = self._inputs.decode_arrays(size, width) if mode == "decode" else self._inputs.mixed_arrays(size, width)
        samp = self._inputs.sampling([], inp["lengths"].shape[0])
        groups = self._core.registered_groups() if lora_groups is None else tuple(lora_groups)
        with self._step_lock:
            return self.runner.lower(mode, self.tables, inp, samp, lora_groups=groups)

    def precompile(self, sampling: bool = True, max_workers: Optional[int] = None,
                   on_compiled: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Compile every step program the engine can run (``step_programs``) before serving, so no request waits
        for a compilation (a 7B step program takes tens of seconds to compile on the GPU). Programs compile in
        parallel threads. ``sampling``: also the programs for temperature > 0 (greedy-only batches use their
        own). Returns one record per program compiled now."""
        steps = []
        for temp in ((0.0, 1.0) if sampling else (0.0,)):
            for groups, mode, n, width in self.step_programs():
                if mode == "decode":
                    inp = self._inputs.decode_arrays(n, width)
                else:
                    inp = self._inputs.mixed_arrays(n, width)
                rows = inp["lengths"].shape[0]
                samp = self._inputs.sampling([], rows)
                samp["temperature"][:] = temp
                info = dict(mode=mode, size=n, width=width, greedy=temp == 0.0, lora_groups=list(groups))
                steps.append((mode, inp, samp, groups, info))
        with self._step_lock:
            return self.runner.precompile(self.tables, steps, max_workers, on_compiled)

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: Sequence[Prompt], adapters=None, sampling=None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order.

        Several processes: call it on every process with the same arguments (each returns the same outputs),
        or on process 0 only while the others run ``follow()``."""
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
            self._outputs.listen(r.request_id, collect, stream=False)
            self._core.inbox.put(("add", r))
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
            if rid in self._outputs.listeners or rid in self._core.requests:
                self.abort(rid)
                self._outputs.forget(rid)

    def logits(self, prompts: Sequence[Sequence[int]], adapters=None) -> list[np.ndarray]:
        """Float32 logits [len, V] of every position of every prompt (scoring; nothing is cached)."""
        n = len(prompts)
        adapters = _per_prompt(adapters, n, "adapters")
        with self._step_lock:
            reqs = [self._make_request(p, a, None, None) for p, a in zip(prompts, adapters)]
            self._core.agree("logits", ([r.prompt for r in reqs], adapters))  # a program over every process
            changed: list[Request] = []
            self._core.drain(changed)  # the pool is donated to this program: nothing may be in flight
            self._outputs.emit(changed)
            held = []
            try:
                for r in reqs:
                    if r.adapter is not None and r.adapter not in held:
                        if not self.adapters.acquire(r.adapter):
                            raise CapacityError(f"no room on the device for adapter {r.adapter!r} right now")
                        held.append(r.adapter)
                reqs_sorted = [reqs[i] for i in np.argsort(self._slots([r.adapter for r in reqs]), kind="stable")]
                inp = self._inputs.scoring(reqs_sorted)
                samp = self._inputs.sampling(reqs_sorted, len(inp["last_index"]))
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
            adapter_readers=self.adapters.reader_mode,
            pinned_host_reserved_bytes=self._pinned_reserved[0],
            pinned_host_reserve_s=self._pinned_reserved[1],
            host_arena_bytes=self._arena_info[0],
            host_arena_registered=self._arena_info[1],
            host_arena_register_s=self._arena_info[2],
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            compiled_shapes=len(self.runner.compiled_shapes),
            preemptions=self.scheduler.num_preemptions,
            kernel_backend=self.kernel_backend,
            **{f"adapter_{k}": v for k, v in self.adapters.counters.items()},
            **self._core.counters,
            **self._outputs.counters,
        )
        # The share of step time in which the device may have waited for the host: host time of the steps
        # queued when the step before them had already finished (an upper bound). host_busy_share is all of
        # the host's time in step(), most of it overlapped with the device's work.
        s["host_overhead_share"] = s["exposed_host_s"] / s["step_time_s"] if s["step_time_s"] else 0.0
        s["host_busy_share"] = s["host_time_s"] / s["step_time_s"] if s["step_time_s"] else 0.0
        # Where the host time goes: building inputs, queuing programs (dispatch, with the input transfer),
        # scheduling (with adapter loads and prefetch), reading outputs; "other" is the rest of step().
        parts = dict(self._core.host_parts, dispatch=self.runner.dispatch_s)
        parts["other"] = max(s["host_time_s"] - sum(parts.values()), 0.0)
        s["host_breakdown_s"] = parts
        s["dispatch_breakdown_s"] = dict(self.runner.dispatch_parts)  # pack + tables + launch = dispatch
        return s


def _per_prompt(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise RequestError(f"{what} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def _progress(n: int):
    from tqdm.auto import tqdm
    return tqdm(total=n, desc="generate", unit="req")


def _or_numpy(put):
    """``put``, or the numpy array itself where it fails (pinned memory exhausted): slower uploads, not a failed
    adapter."""
    def to_host(x):
        try:
            return put(x)
        except Exception:  # noqa: BLE001
            return x
    return to_host
