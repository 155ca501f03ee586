"""A Scheduler over a real page pool and AdapterStore with the device replaced by bookkeeping.

Each ``step`` does what ``Engine.step`` does around the model, reading every step before the next: schedule,
then one token for every request the step samples (a decode token, or a prompt chunk that ends the prompt),
finishing requests at their max_tokens.
The clock is simulated (``dt`` seconds a step), so policies that read time are tested deterministically.
"""

from __future__ import annotations

import itertools
from typing import Optional

import numpy as np

from slora_jax.adapters.paging import AdapterTables
from slora_jax.adapters.store import STAGING_LIMIT_BYTES, AdapterStore
from slora_jax.adapters.synthetic import random_lora
from slora_jax.config import EngineConfig
from slora_jax.engine.request import Request
from slora_jax.engine.scheduler import Scheduler
from slora_jax.memory.host_arena import HostArena
from slora_jax.memory.pool import PoolLayout, UnifiedPagePool
from slora_jax.model.random_checkpoint import tiny_llama_config
from slora_jax.types import RequestMetrics, SamplingParams

TINY = tiny_llama_config()
TARGETS = ("q_proj", "v_proj")


class Sim:
    def __init__(self, num_pages: int = 256, adapters: Optional[dict] = None, dt: float = 1.0,
                 staging_limit_bytes: int = STAGING_LIMIT_BYTES, arena_bytes: Optional[int] = 64 << 20, **econf):
        econf.setdefault("dtype", "float32")
        self.econf = EngineConfig(num_pages=num_pages, **econf)
        self.cfg = TINY
        self.layout = PoolLayout(TINY.num_layers, num_pages, self.econf.page_rows, TINY.kv_size)
        self.pool = UnifiedPagePool(self.layout)
        self.tables = AdapterTables(TINY, self.layout, self.econf.max_adapters_on_device, self.econf.max_lora_rank)
        self.writes: list[tuple[int, np.ndarray, np.ndarray]] = []  # (step, pages, tiles) of every pool commit
        self.store = AdapterStore(TINY, self.econf, self.layout, self.pool, self.tables, self._write, np.float32,
                                  stage=lambda tiles: tiles, staging_limit_bytes=staging_limit_bytes,
                                  arena=None if arena_bytes is None else HostArena(arena_bytes))
        self.sched = Scheduler(self.econf, self.pool, self.store)
        self.now = 0.0
        self.dt = dt
        self.finished: list[Request] = []
        self.outputs: list = []  # SchedulerOutput of every step
        self._ids = itertools.count()
        for i, (name, rank) in enumerate((adapters or {}).items()):
            self.store.register_weights(name, random_lora(TINY, rank, TARGETS, seed=i, name=name))

    def _write(self, pages, tiles) -> None:
        self.writes.append((self.sched.steps, np.asarray(pages).copy(), np.asarray(tiles).copy()))

    def add(self, prompt_len: int, max_tokens: int, adapter: Optional[str] = None,
            at: Optional[float] = None) -> Request:
        req = Request(request_id=f"r{next(self._ids)}", prompt=[5] * prompt_len, adapter=adapter,
                      sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True), seed=0,
                      max_len=TINY.max_position_embeddings,
                      metrics=RequestMetrics(arrival_time=self.now if at is None else at))
        self.sched.add(req)
        return req

    def step(self):
        out = self.sched.schedule(self.now)
        self.outputs.append(out)
        end = self.now + self.dt
        for r in out.sampled:
            r.pending -= 1
            r.output.append(7)
            if r.metrics.first_token_time is None:
                r.metrics.first_token_time = end
            if len(r.output) >= r.sampling.max_tokens or r.context_len >= r.max_len:
                self.sched.finish(r, "length")
                r.metrics.finish_time = end
                self.finished.append(r)
        self.finished.extend(out.finished)
        self.now = end
        self.pool.check_invariants()
        return out

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work():
                return
            self.step()
        raise AssertionError("simulation did not drain")
