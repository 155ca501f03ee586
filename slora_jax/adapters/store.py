"""AdapterStore: every registered adapter, its host copy, and its place (if any) in the device pool.

Tiers: disk (registered, validated config) -> host (page-form weights in a byte-bounded LRU cache; pinned
host memory on GPU) -> device (pages of the unified pool + a slot in the index tables). Device residency
is reference-counted by the requests that use an adapter; unreferenced adapters stay resident until their
pages are needed, then the least recently used goes first (its host copy stays, as in S-LoRA).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from slora_jax.adapters.paging import AdapterTables, PagedAdapter, page_adapter
from slora_jax.adapters.peft import load_peft_adapter, read_adapter_config
from slora_jax.config import EngineConfig, ModelConfig
from slora_jax.errors import AdapterError, UnknownAdapterError
from slora_jax.memory.pool import ADAPTER, PoolLayout, UnifiedPagePool
from slora_jax.types import AdapterInfo


@dataclass
class _Record:
    name: str
    path: str
    config: dict
    rank: int = 0
    ranks: dict = field(default_factory=dict)
    targets: tuple = ()
    slot: Optional[int] = None
    pages: Optional[np.ndarray] = None
    refcount: int = 0
    last_used: float = 0.0
    loads: int = 0
    host_bytes: int = 0
    in_memory: bool = False  # registered from weights, not a folder: its host copy is never dropped


class AdapterStore:
    def __init__(self, cfg: ModelConfig, econf: EngineConfig, layout: PoolLayout, pool: UnifiedPagePool,
                 tables: AdapterTables, write_pages: Callable[[np.ndarray, object], None], dtype,
                 to_host: Callable[[np.ndarray], object] = lambda x: x):
        self.cfg, self.econf, self.layout, self.pool, self.tables = cfg, econf, layout, pool, tables
        self._write_pages = write_pages
        self._to_host = to_host  # numpy -> the host tier's array (pinned host memory on GPU)
        self._dtype = dtype
        self._records: dict[str, _Record] = {}
        self._host: "OrderedDict[str, PagedAdapter]" = OrderedDict()
        self._host_bytes = 0
        self._free_slots = list(range(tables.num_slots - 1, -1, -1))
        self._lock = threading.RLock()  # registration may come from server threads
        self.counters = {"loads": 0, "evictions": 0, "load_bytes": 0, "host_loads": 0, "host_evictions": 0}

    # ------------------------------------------------------------------ registration
    def register(self, name: str, path, lazy: bool = False) -> AdapterInfo:
        """Register ``path`` under ``name``; validates the config now and, unless lazy, the weights too."""
        with self._lock:
            self._check_name(name)
        path = str(Path(path).expanduser())
        config = read_adapter_config(path, self.cfg, self.econf.max_lora_rank)
        rec = _Record(name=name, path=path, config=config)
        if not lazy:
            paged, lora = self._read(rec)
            self._describe(rec, lora)
        with self._lock:
            self._check_name(name)
            self._records[name] = rec
            if not lazy:
                self._host_put(name, paged)
            return self._info(rec)

    def register_weights(self, name: str, lora) -> AdapterInfo:
        """Register LoraWeights already in memory (e.g. just trained); kept in the host tier for good."""
        self._check_name(name)
        rec = _Record(name=name, path=lora.path or "<memory>", config=dict(lora.config), in_memory=True)
        self._describe(rec, lora)
        paged = page_adapter(lora, self.cfg, self.layout, self.econf.max_lora_rank, self._dtype)
        paged.tiles = self._to_host(paged.tiles)
        with self._lock:
            self._check_name(name)
            self._records[name] = rec
            self._host_put(name, paged)
            return self._info(rec)

    def _check_name(self, name) -> None:
        if not isinstance(name, str) or not name or name != name.strip():
            raise AdapterError(f"adapter name must be a non-empty string without surrounding spaces, got {name!r}")
        if name in self._records:
            raise AdapterError(f"an adapter named {name!r} is already loaded (unload it first)")

    def unregister(self, name: str) -> None:
        with self._lock:
            rec = self._get(name)
            if rec.refcount:
                raise AdapterError(f"adapter {name!r} is in use by {rec.refcount} running request(s)")
            if rec.slot is not None:
                self._evict(rec)
            self._host_drop(name)
            del self._records[name]

    def __contains__(self, name: str) -> bool:
        return name in self._records

    def names(self) -> list[str]:
        return list(self._records)

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            return self._info(self._get(name))

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(r) for r in self._records.values()]

    # ------------------------------------------------------------------ device residency
    def is_resident(self, name: str) -> bool:
        return self._get(name).slot is not None

    def slot_of(self, name: str) -> int:
        slot = self._get(name).slot
        assert slot is not None, f"adapter {name} is not on the device"
        return slot

    def pages_needed(self, name: str, resident_too: bool = False) -> int:
        """Pages a load would take now (0 when already resident, unless ``resident_too``).
        May read the adapter from disk."""
        rec = self._get(name)
        if rec.slot is not None:
            return int(rec.pages.size) if resident_too else 0
        return self._host_get(rec).num_pages

    def evictable_pages(self, exclude: set = frozenset()) -> int:
        return sum(int(r.pages.size) for r in self._records.values()
                   if r.slot is not None and r.refcount == 0 and r.name not in exclude)

    def acquire(self, name: str) -> bool:
        """Make ``name`` resident and take a reference. False (nothing changed) if it cannot fit now."""
        with self._lock:
            rec = self._get(name)
            if rec.slot is None and not self._load(rec, evict=True):
                return False
            rec.refcount += 1
            rec.last_used = time.monotonic()
            return True

    def release(self, name: str) -> None:
        with self._lock:
            rec = self._records.get(name)
            if rec is not None and rec.refcount > 0:
                rec.refcount -= 1
                rec.last_used = time.monotonic()

    def prefetch(self, name: str, reserve: int = 0) -> bool:
        """Start loading ``name`` if it fits in free pages beyond ``reserve`` without evicting anyone."""
        with self._lock:
            rec = self._get(name)
            if rec.slot is not None:
                return False
            need = self._host_get(rec).num_pages
            if self.pool.free_pages - reserve < need or not self._free_slots:
                return False
            return self._load(rec, evict=False)

    def free_unreferenced(self, pages_wanted: int, keep: set = frozenset()) -> int:
        """Evict unreferenced adapters (LRU first) until ``pages_wanted`` pages are free; returns pages freed."""
        freed = 0
        with self._lock:
            for rec in sorted(self._records.values(), key=lambda r: r.last_used):
                if self.pool.free_pages >= pages_wanted:
                    break
                if rec.slot is not None and rec.refcount == 0 and rec.name not in keep:
                    freed += int(rec.pages.size)
                    self._evict(rec)
        return freed

    def _load(self, rec: _Record, evict: bool) -> bool:
        paged = self._host_get(rec)
        need = paged.num_pages
        if evict and (self.pool.free_pages < need or not self._free_slots):
            for victim in sorted(self._records.values(), key=lambda r: r.last_used):
                if self.pool.free_pages >= need and self._free_slots:
                    break
                if victim.slot is not None and victim.refcount == 0:
                    self._evict(victim)
        if self.pool.free_pages < need or not self._free_slots:
            return False
        pages = self.pool.alloc(need, ADAPTER)
        slot = self._free_slots.pop()
        # Asynchronous: the copy is enqueued on the device stream; the next step waits only if needed.
        self._write_pages(pages, paged.tiles)
        self.tables.set_slot(slot, paged, pages)
        rec.slot, rec.pages = slot, pages
        rec.loads += 1
        rec.last_used = time.monotonic()
        self.counters["loads"] += 1
        self.counters["load_bytes"] += paged.nbytes
        return True

    def _evict(self, rec: _Record) -> None:
        self.tables.clear_slot(rec.slot)
        self.pool.free(rec.pages, ADAPTER)
        self._free_slots.append(rec.slot)
        rec.slot, rec.pages = None, None
        self.counters["evictions"] += 1

    # ------------------------------------------------------------------ host tier
    def _read(self, rec: _Record):
        lora = load_peft_adapter(rec.path, self.cfg, self.econf.max_lora_rank, rec.name)
        paged = page_adapter(lora, self.cfg, self.layout, self.econf.max_lora_rank, self._dtype)
        paged.tiles = self._to_host(paged.tiles)
        self.counters["host_loads"] += 1
        return paged, lora

    def _describe(self, rec: _Record, lora) -> None:
        rec.rank = int(lora.rank)
        rec.targets = tuple(lora.target_modules)
        rec.ranks = {m: int(ml.ranks.max()) for m, ml in lora.modules.items()}

    def _host_get(self, rec: _Record) -> PagedAdapter:
        with self._lock:
            paged = self._host.get(rec.name)
            if paged is not None:
                self._host.move_to_end(rec.name)
                return paged
        paged, lora = self._read(rec)
        with self._lock:
            self._describe(rec, lora)
            self._host_put(rec.name, paged)
        return paged

    def _host_put(self, name: str, paged: PagedAdapter) -> None:
        self._host_drop(name)
        self._host[name] = paged
        self._host_bytes += paged.nbytes
        self._records[name].host_bytes = paged.nbytes
        for old in list(self._host):
            if self._host_bytes <= self.econf.host_cache_bytes:
                break
            if old != name and not self._records[old].in_memory:
                self._host_drop(old)
                self.counters["host_evictions"] += 1

    def _host_drop(self, name: str) -> None:
        paged = self._host.pop(name, None)
        if paged is not None:
            self._host_bytes -= paged.nbytes
            if name in self._records:
                self._records[name].host_bytes = 0

    # ------------------------------------------------------------------ helpers
    def _get(self, name: str) -> _Record:
        rec = self._records.get(name)
        if rec is None:
            known = ", ".join(sorted(self._records)[:10]) or "none"
            raise UnknownAdapterError(f"unknown adapter {name!r} (loaded adapters: {known})")
        return rec

    def _info(self, rec: _Record) -> AdapterInfo:
        where = "device" if rec.slot is not None else ("host" if rec.name in self._host else "disk")
        return AdapterInfo(name=rec.name, path=rec.path, rank=rec.rank, ranks=dict(rec.ranks),
                           target_modules=rec.targets, location=where,
                           device_pages=0 if rec.pages is None else int(rec.pages.size),
                           host_bytes=rec.host_bytes, loads=rec.loads)

    @property
    def host_bytes(self) -> int:
        return self._host_bytes
