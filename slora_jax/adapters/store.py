"""AdapterStore: every registered adapter, its host copy, and its place (if any) in the device pool.

Tiers: disk (registered, validated config) -> host (page-form weights in a byte-bounded LRU cache, in the
blocks of one shared arena that reader processes write into, registered for DMA on GPU) -> device (pages of
the unified pool + a slot in the index tables). Device residency is reference-counted by the requests that use
an adapter; unreferenced adapters stay resident until their pages are needed, then the least recently used
goes first (its host copy stays, as in S-LoRA).

Loads are split in two so that prefetch really overlaps compute: ``prefetch`` allocates pages and a slot
and *stages* the weights (an asynchronous host->device copy into a buffer of their own), and the first
``acquire`` *commits* them (a device-side scatter into the pool). Had the copy gone straight into the pool,
the step dispatched right after it would wait for the copy, since every step reads the pool. An adapter
that is not in host memory is read from disk by a pool of reader processes or threads (``adapters.reader``:
straight into the page-tile layout, in an arena block), never on the engine's thread: a request whose
adapter is being read waits while the rest of the batch runs, and ``read_ahead`` starts the reads for
requests further down the queue. A read that fails marks its adapter failed: its requests get an
AdapterError naming the reason, the others go on.

Every load is logged (``load_log``): who issued it (prefetch or the admission that needed it), at which
scheduling step, the step that needed it, and how long that step waited for it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from slora_jax.adapters import read_processes
from slora_jax.adapters.paging import AdapterTables, PagedAdapter, canonical_tiles, page_adapter
from slora_jax.adapters.reader import AdapterPlan, plan_adapter, read_paged_adapter
from slora_jax.config import EngineConfig, ModelConfig
from slora_jax.errors import AdapterError, UnknownAdapterError
from slora_jax.memory.host_arena import ArenaBlock, HostArena
from slora_jax.memory.pool import ADAPTER, PoolLayout, UnifiedPagePool
from slora_jax.types import AdapterInfo


@dataclass
class LoadEvent:
    """One host->device load of an adapter."""

    name: str
    nbytes: int
    issued_step: int  # scheduling step during which the copy was started
    prefetched: bool  # started by prefetch (True) or by the admission that needed it (False)
    read_s: float = 0.0  # time the engine thread waited for this load's disk read (0 when in host memory)
    needed_step: Optional[int] = None  # step of the first acquire after the load; None while unused
    ready_when_needed: Optional[bool] = None  # the copy had completed when that step began
    wait_s: float = 0.0  # time that step waited for the copy to complete
    evicted_unused: bool = False  # dropped again before any request used it
    busy: bool = True  # other requests were in the step that waited for it (False: the device was idle)

    @property
    def hidden(self) -> bool:
        """Issued by prefetch at least one step before the step that needed it."""
        return self.prefetched and self.needed_step is not None and self.needed_step > self.issued_step

    @property
    def visible_s(self) -> float:
        """Time the step that needed this load spent on it (disk read on the engine thread + copy wait).
        For a load not hidden this also includes the copy's dispatch, which is not timed: a lower bound."""
        return self.read_s + self.wait_s


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
    num_pages: Optional[int] = None  # known once the weights were read (or computed from the config)
    in_memory: bool = False  # registered from weights, not a folder: its host copy is never dropped
    shared_id: Optional[int] = None  # id() of the LoraWeights whose host copy it shares
    staged: object = None  # device copy of the tiles not yet written into the pool
    staged_bytes: int = 0
    stage_wait: tuple = (True, 0.0)  # (copy was ready, seconds waited for it) when written into the pool
    pending: Optional[LoadEvent] = None  # the load whose first use is still to come
    plan: Optional[AdapterPlan] = None  # page layout from the config (registered from a folder)


_log = logging.getLogger("slora_jax.adapters")
_LOG_MAX = 100_000


def default_read_workers() -> int:
    """Reader threads when the config names none: reads are bound by memory copies that release the GIL,
    so one per core helps, up to where the page cache's bandwidth is shared out."""
    return max(1, min(8, os.cpu_count() or 1))


def _default_stage(device=None) -> Callable:
    """host tiles -> an array in the device's own memory, copied asynchronously."""
    import jax

    dev = device or jax.devices()[0]
    try:
        target = jax.sharding.SingleDeviceSharding(dev, memory_kind=dev.default_memory().kind)
    except Exception:  # a backend without memory kinds
        target = dev

    def stage(tiles):
        try:
            return jax.device_put(tiles, target)
        except Exception:  # a memory-kind transfer this backend cannot do (CPU): through numpy
            return jax.device_put(np.asarray(tiles), target)
    return stage


# Device memory that prefetched copies may hold outside the pool before their first use writes them into it.
# The pool takes most of the device (EngineConfig.memory_fraction), so the staged copies must stay a small,
# bounded share of the rest: with a thousand adapters in host memory, prefetch would otherwise stage every
# one that fits in the pool (measured on the H200: 104 MB a copy until the allocator ran out).
STAGING_LIMIT_BYTES = 2 << 30
# Threads one read may use when it is the only one under way (benchmarks/cold_start.py: one reader thread
# reaches ~2.2 GB/s on the H200's host, eight reader processes ~11.8 GB/s together).
MAX_THREADS_PER_READ = 4


def _aliases(x, buf: np.ndarray) -> bool:
    """Whether ``x`` (numpy, or a jax array that may wrap host memory zero-copy) lies in ``buf``."""
    if isinstance(x, np.ndarray):
        return np.shares_memory(x, buf)
    shards = getattr(x, "addressable_shards", None)
    parts = [s.data for s in shards] if shards else [x]  # every device's buffer (JAX on CPU may wrap each)
    for part in parts:
        try:
            ptr = part.unsafe_buffer_pointer()
        except Exception:  # noqa: BLE001 - no pointer: not a view of ours
            continue
        if buf.ctypes.data <= ptr < buf.ctypes.data + buf.nbytes:
            return True
    return False


def _wait(x) -> tuple[bool, float]:
    """(was ready already, seconds spent waiting) for a staged device array."""
    is_ready = getattr(x, "is_ready", None)
    ready = bool(is_ready()) if is_ready is not None else True
    t0 = time.perf_counter()
    block = getattr(x, "block_until_ready", None)
    if block is not None and not ready:
        block()
    return ready, time.perf_counter() - t0


class AdapterStore:
    def __init__(self, cfg: ModelConfig, econf: EngineConfig, layout: PoolLayout, pool: UnifiedPagePool,
                 tables: AdapterTables, write_pages: Callable[[np.ndarray, object], None], dtype,
                 to_host: Callable[[np.ndarray], object] = lambda x: x, stage: Optional[Callable] = None,
                 staging_limit_bytes: int = STAGING_LIMIT_BYTES, arena: Optional[HostArena] = None):
        """``arena``: the host tier's memory (the store closes it); without one, or where it has no room, the
        host tier keeps copies made by ``to_host`` (numpy -> pinned host memory on GPU)."""
        self.cfg, self.econf, self.layout, self.pool, self.tables = cfg, econf, layout, pool, tables
        self._write_pages = write_pages
        self._to_host = to_host
        self._arena = arena
        self._blocks: dict[int, tuple[object, ArenaBlock]] = {}  # id(tiles) -> (tiles, their arena block)
        self._blocks_lock = threading.Lock()  # reader threads take it: never the store's lock (see _late_block)
        self._stage = stage  # host tiles -> device array, asynchronously (default: jax.device_put)
        self._dtype = dtype
        self._staging_limit = staging_limit_bytes
        self._staged_bytes = 0  # staged copies not yet written into the pool
        self._staged: "OrderedDict[str, _Record]" = OrderedDict()  # those copies' adapters, oldest first
        self._records: dict[str, _Record] = {}
        self._resident: dict[str, _Record] = {}  # on the device; kept apart so eviction never scans thousands
        self._host: "OrderedDict[str, PagedAdapter]" = OrderedDict()
        self._host_bytes = 0
        self._tile_users: dict[int, int] = {}  # id(tiles) -> names sharing that host array (counted once)
        self._shared: dict[int, tuple] = {}  # id(LoraWeights) -> (weights, PagedAdapter, users)
        self._free_slots = list(range(tables.num_slots - 1, -1, -1))
        self._lock = threading.RLock()  # registration may come from server threads
        self._reader: Optional[ThreadPoolExecutor] = None
        self._procs = None  # read_processes.ProcessReaders, when adapter_readers is "processes"
        self._procs_state = "off"  # -> "starting" -> "ready" | "unavailable"; "closed"
        self._procs_thread: Optional[threading.Thread] = None
        self._procs_lock = threading.Lock()
        self._read_workers = int(econf.adapter_read_workers or default_read_workers())
        self._reading: dict[str, tuple[_Record, Future]] = {}
        self._read_failed: dict[str, str] = {}  # name -> why its read failed
        self._stats_lock = threading.Lock()  # reader threads update the read counters
        self._scratch = threading.local()  # per reader thread: a buffer the tiles are built in, if reusable
        probe = np.zeros(1, np.float32)
        # When the host tier copies the tiles (into pinned memory on GPU), a reader builds them in a buffer
        # of its own, reused: a new one would cost a page fault per 4 KiB (10+ ms for 51 MB).
        self._host_copies = to_host(probe) is not probe
        self._reads_active = 0
        self._reads_mark = 0.0
        self.step = 0
        self.busy = True  # set by the scheduler: whether the step being scheduled has other work
        self.load_log: list[LoadEvent] = []  # the most recent loads (older ones are dropped past _LOG_MAX)
        self._log_dropped = 0
        self.counters = {"loads": 0, "evictions": 0, "load_bytes": 0, "host_loads": 0, "host_evictions": 0,
                         "prefetch_loads": 0, "prefetch_unused": 0, "hidden_loads": 0, "load_wait_s": 0.0,
                         # Disk reads, on any thread: seconds summed over reads, bytes, count, failures, wall
                         # time with at least one read under way, and throughput (aggregate and per reader).
                         "load_read_s": 0.0, "read_bytes": 0, "reads": 0, "read_failures": 0,
                         "read_wall_s": 0.0, "read_gbps": 0.0, "read_gbps_per_reader": 0.0}

    # ------------------------------------------------------------------ registration
    def register(self, name: str, path, lazy: bool = False) -> AdapterInfo:
        """Register ``path`` under ``name``; validates the config now and, unless lazy, the weights too."""
        with self._lock:
            self._check_name(name)
        path = str(Path(path).expanduser())
        plan = plan_adapter(path, self.cfg, self.layout, self.econf.max_lora_rank, self._dtype)
        rec = _Record(name=name, path=path, config=plan.config, plan=plan, rank=plan.rank, ranks=dict(plan.ranks),
                      targets=plan.targets, num_pages=plan.num_pages)
        self._start_readers(self._plan_bytes(rec))
        if not lazy:
            with self._lock:
                block = self._arena_block(self._plan_bytes(rec))
            paged = self._read(rec, block)  # on the caller's thread: it waits for the result anyway
        with self._lock:
            try:
                self._check_name(name)
            except AdapterError:
                if not lazy:
                    self._release_tiles(paged)
                raise
            self._records[name] = rec
            if not lazy:
                self._host_put(name, paged)
            return self._info(rec)

    def register_weights(self, name: str, lora) -> AdapterInfo:
        """Register LoraWeights already in memory (e.g. just trained); kept in the host tier for good.

        Registering the same LoraWeights object under several names shares one host copy (device pages
        stay separate per name)."""
        self._check_name(name)
        rec = _Record(name=name, path=lora.path or "<memory>", config=dict(lora.config), in_memory=True)
        with self._lock:  # a copy shared already is taken under the lock: no unregister can free it meanwhile
            if self._shared_copy(lora) is not None:
                return self._add_in_memory(rec, lora, None)
        paged = page_adapter(lora, self.cfg, self.layout, self.econf.max_lora_rank, self._dtype)
        with self._lock:
            block = self._arena_block(paged.tiles.nbytes)
        if block is None:
            paged.tiles = self._to_host(paged.tiles)
        else:
            host = self._arena.view(block, paged.tiles.nbytes).view(paged.tiles.dtype).reshape(paged.tiles.shape)
            host[...] = paged.tiles
            paged.tiles = host
            self._keep_block(paged, block)
        with self._lock:
            try:
                return self._add_in_memory(rec, lora, paged)
            except AdapterError:
                self._release_tiles(paged)  # a copy of its own, not in the host tier
                raise

    def _shared_copy(self, lora) -> Optional[PagedAdapter]:
        entry = self._shared.get(id(lora))
        return entry[1] if entry is not None and entry[0] is lora else None

    def _add_in_memory(self, rec: _Record, lora, paged: Optional[PagedAdapter]) -> AdapterInfo:
        """(Under the lock.) ``rec`` joins with ``lora``'s shared host copy where there is one by now (``paged``,
        made meanwhile by this caller, is then given back), else with ``paged``."""
        self._check_name(rec.name)
        shared = self._shared_copy(lora)
        if shared is not None:
            if paged is not None:
                self._release_tiles(paged)
            paged = shared
        self._describe(rec, lora, paged)
        self._records[rec.name] = rec
        lora_id = id(lora)
        entry = self._shared.get(lora_id)
        users = (entry[2] if shared is not None else 0) + 1
        self._shared[lora_id] = (lora, paged, users)
        rec.shared_id = lora_id
        self._host_put(rec.name, paged)
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
            sid = rec.shared_id
            entry = self._shared.get(sid) if sid is not None else None
            if entry is not None:
                if entry[2] <= 1:
                    del self._shared[sid]
                else:
                    self._shared[sid] = (entry[0], entry[1], entry[2] - 1)
            reading = self._reading.pop(name, None)
            if reading is not None:  # a read under way finishes unseen: its result is dropped, its block freed
                reading[1].add_done_callback(self._drop_result)
            self._read_failed.pop(name, None)
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
    def begin_step(self, step: int) -> None:
        """Called by the scheduler at the start of every scheduling step (loads are timed in steps)."""
        self.step = step
        if self._reading:
            self._collect_reads()
        if self._arena is not None:
            self._arena.reclaim()  # completed uploads: their device arrays go

    def is_resident(self, name: str) -> bool:
        return self._get(name).slot is not None

    def slot_of(self, name: str) -> int:
        slot = self._get(name).slot
        assert slot is not None, f"adapter {name} is not on the device"
        return slot

    def pages_needed(self, name: str, resident_too: bool = False) -> int:
        """Pages a load would take now (0 when already resident, unless ``resident_too``); known from the
        config, so nothing is read. An adapter whose read failed still answers: the scheduler sizes its
        requests with this, and ``acquire`` is where they learn of the failure."""
        with self._lock:  # request threads call this while the engine thread may evict
            rec = self._get(name)
            if rec.slot is not None:
                return int(rec.pages.size) if resident_too else 0
            return rec.num_pages

    def ready_for_use(self, name: str) -> bool:
        """Resident, and its copy (if any is still pending) was started in an earlier step."""
        rec = self._get(name)
        return rec.slot is not None and (rec.pending is None or rec.pending.issued_step < self.step)

    def reading(self, name: str) -> bool:
        """A background disk read of ``name`` is under way."""
        return name in self._reading

    def failed(self, name: str) -> Optional[str]:
        """Why the adapter's read failed, or None."""
        return self._read_failed.get(name)

    def read_ahead(self, names) -> int:
        """Start background reads of the adapters among ``names`` (in order) that are neither in host memory
        nor being read, while the bytes being read stay within half the host cache (so that reads ahead cannot
        by themselves flush the adapters read for sooner use). Returns how many reads it started."""
        started = 0
        with self._lock:
            inflight = sum(self._plan_bytes(rec) for rec, _ in self._reading.values())
            for name in dict.fromkeys(names):
                rec = self._records.get(name)
                if (rec is None or rec.slot is not None or name in self._host or name in self._reading
                        or name in self._read_failed or rec.plan is None):
                    continue
                size = self._plan_bytes(rec)
                if inflight + size > self.econf.host_cache_bytes // 2 and inflight:
                    break
                self._read_async(rec)
                inflight += size
                started += 1
        return started

    def evictable_pages(self, exclude: set = frozenset()) -> int:
        return sum(int(r.pages.size) for r in self._resident.values() if r.refcount == 0 and r.name not in exclude)

    def resident_names(self) -> list[str]:
        return list(self._resident)

    def acquire(self, name: str) -> bool:
        """Make ``name`` resident and take a reference. False (nothing changed) if it cannot fit now."""
        with self._lock:
            rec = self._get(name)
            if rec.slot is None and not self._load(rec, evict=True, prefetched=False):
                return False
            if rec.pending is not None:
                self._commit(rec)
            rec.refcount += 1
            rec.last_used = time.monotonic()
            return True

    def release(self, name: str) -> None:
        with self._lock:
            rec = self._records.get(name)
            if rec is not None and rec.refcount > 0:
                rec.refcount -= 1
                rec.last_used = time.monotonic()

    def prefetch(self, name: str, reserve: int = 0, keep: set = frozenset()) -> bool:
        """Start loading ``name`` ahead of need. It may use free pages beyond ``reserve`` and evict unreferenced
        adapters not in ``keep`` (least recently used first). Not in host memory: read it from disk on a
        background thread now, stage it on a later call. True if a device copy was started."""
        with self._lock:
            rec = self._get(name)
            self._raise_if_failed(name)
            if rec.slot is not None:
                return False
            paged = self._host.get(name)
            if paged is None:
                self._read_async(rec)
                return False
            # The oldest staged copies are written into their pages (already theirs) to make room: held
            # back instead, copies staged for requests that then left would keep the room for good.
            for old in list(self._staged.values()):
                if self._staged_bytes + paged.nbytes <= self._staging_limit:
                    break
                self._write_staged(old)
            need = paged.num_pages
            if not self._make_room(need + reserve, keep | {name}) or self.pool.free_pages - reserve < need:
                return False
            return self._load(rec, evict=False, prefetched=True)

    @property
    def staged_bytes(self) -> int:
        """Bytes of device copies waiting outside the pool for their adapter's first use."""
        return self._staged_bytes

    def free_unreferenced(self, pages_wanted: int, keep: set = frozenset()) -> int:
        """Evict unreferenced adapters (LRU first) until ``pages_wanted`` pages are free; returns pages freed."""
        freed = 0
        with self._lock:
            for rec in sorted(self._resident.values(), key=lambda r: r.last_used):
                if self.pool.free_pages >= pages_wanted:
                    break
                if rec.refcount == 0 and rec.name not in keep:
                    freed += int(rec.pages.size)
                    self._evict(rec)
        return freed

    def evict_all(self) -> int:
        """Evict every unreferenced adapter from the device (host copies stay); returns how many."""
        with self._lock:
            victims = [r for r in self._resident.values() if r.refcount == 0]
            for rec in victims:
                self._evict(rec)
            return len(victims)

    def _make_room(self, pages_wanted: int, keep: set) -> bool:
        """Evict unreferenced adapters outside ``keep`` (LRU first) until the pages and a slot are free."""
        if self.pool.free_pages >= pages_wanted and self._free_slots:
            return True
        for rec in sorted(self._resident.values(), key=lambda r: r.last_used):
            if self.pool.free_pages >= pages_wanted and self._free_slots:
                break
            if rec.refcount == 0 and rec.name not in keep:
                self._evict(rec)
        return self.pool.free_pages >= pages_wanted and bool(self._free_slots)

    def _load(self, rec: _Record, evict: bool, prefetched: bool) -> bool:
        self._raise_if_failed(rec.name)
        read_s = 0.0
        paged = self._host.get(rec.name)
        if paged is None:
            t0 = time.perf_counter()
            paged = self._host_get(rec)
            read_s = time.perf_counter() - t0
        else:
            self._host.move_to_end(rec.name)
        need = paged.num_pages
        if evict and (self.pool.free_pages < need or not self._free_slots):
            self._make_room(need, {rec.name})
        if self.pool.free_pages < need or not self._free_slots:
            return False
        pages = self.pool.alloc(need, ADAPTER)
        slot = self._free_slots.pop()
        stage = self._stage or _default_stage()
        self._stage = stage
        # Asynchronous host->device copy (B's pages turned round there); committed by the first acquire.
        copied = stage(paged.tiles)
        kept = self._blocks.get(id(paged.tiles))
        if kept is not None and _aliases(copied, paged.tiles):  # a backend that wraps host memory (CPU)
            copied = stage(np.array(paged.tiles))
        rec.staged = canonical_tiles(copied, paged.transposed)
        if kept is not None:
            # Nor is the block reused while the copy may still read it. The staged array is what is held: it is
            # ready only once the copy is (it is the copy, or computed from it), and the store holds it anyway;
            # holding the copy as well would double the device memory of staged adapters.
            self._arena.note_transfer(kept[1], rec.staged)
        rec.staged_bytes = paged.nbytes
        self._staged_bytes += paged.nbytes
        self._staged[rec.name] = rec
        self.tables.set_slot(slot, paged, pages)
        rec.slot, rec.pages = slot, pages
        self._resident[rec.name] = rec
        rec.loads += 1
        rec.last_used = time.monotonic()
        rec.pending = LoadEvent(rec.name, paged.nbytes, self.step, prefetched, read_s=read_s, busy=self.busy)
        self.load_log.append(rec.pending)
        if len(self.load_log) > _LOG_MAX:  # a long-lived server: keep the log bounded
            cut = len(self.load_log) // 2
            del self.load_log[:cut]
            self._log_dropped += cut
        self.counters["loads"] += 1
        self.counters["load_bytes"] += paged.nbytes
        if prefetched:
            self.counters["prefetch_loads"] += 1
        return True

    def _write_staged(self, rec: _Record) -> None:
        """Write a staged copy into its pool pages and free it."""
        rec.stage_wait = _wait(rec.staged)
        self._write_pages(rec.pages, rec.staged)
        self._drop_staged(rec)
        if self._arena is not None:
            self._arena.reclaim()  # the arena lets go of it too: it is complete

    def _commit(self, rec: _Record) -> None:
        """The first use of a loaded adapter, in the step being scheduled: its staged copy is written into its
        pages now, unless the staging limit had it written earlier."""
        if rec.staged is not None:
            self._write_staged(rec)
        ready, wait_s = rec.stage_wait
        ev, rec.pending = rec.pending, None
        if ev is not None:
            ev.needed_step, ev.ready_when_needed, ev.wait_s = self.step, ready, wait_s
            self.counters["load_wait_s"] += wait_s
            if ev.hidden:
                self.counters["hidden_loads"] += 1

    def _evict(self, rec: _Record) -> None:
        self.tables.clear_slot(rec.slot)
        self.pool.free(rec.pages, ADAPTER)
        self._free_slots.append(rec.slot)
        self._resident.pop(rec.name, None)
        if rec.pending is not None:  # loaded (prefetched) but never used
            rec.pending.evicted_unused = True
            if rec.pending.prefetched:
                self.counters["prefetch_unused"] += 1
        self._drop_staged(rec)
        rec.slot, rec.pages, rec.pending = None, None, None
        self.counters["evictions"] += 1

    def _drop_staged(self, rec: _Record) -> None:
        if rec.staged is not None:
            self._staged_bytes -= rec.staged_bytes
            self._staged.pop(rec.name, None)
        rec.staged, rec.staged_bytes = None, 0

    # ------------------------------------------------------------------ load accounting
    @property
    def load_count(self) -> int:
        """Loads so far (an index for ``load_summary(since=...)``)."""
        return self._log_dropped + len(self.load_log)

    def load_summary(self, since: int = 0) -> dict:
        """Totals over the loads since ``since`` (a ``load_count``): loads, hidden and visible ones, bytes,
        visible time."""
        events = self.load_log[max(0, since - self._log_dropped):]
        used = [e for e in events if e.needed_step is not None]
        hidden = [e for e in used if e.hidden]
        visible = [e for e in used if not e.hidden]
        stalled = [e for e in visible if e.busy]  # visible while other requests waited on the same step
        return {
            "loads": len(events),
            "loads_used": len(used),
            "loads_hidden": len(hidden),
            "loads_visible": len(visible),
            "loads_visible_busy": len(stalled),
            "loads_unused": sum(1 for e in events if e.evicted_unused),
            "prefetched": sum(1 for e in events if e.prefetched),
            "hidden_fraction": len(hidden) / len(used) if used else None,
            # Among loads whose step had other work (an idle device has nothing to hide a copy behind).
            "hidden_fraction_busy": len(hidden) / (len(hidden) + len(stalled)) if hidden or stalled else None,
            "ready_when_needed_fraction": (sum(1 for e in used if e.ready_when_needed) / len(used)) if used else None,
            "hidden_bytes": int(sum(e.nbytes for e in hidden)),
            "visible_bytes": int(sum(e.nbytes for e in visible)),
            "visible_time_s": float(sum(e.visible_s for e in used)),
            "visible_busy_time_s": float(sum(e.visible_s for e in stalled)),
            "wait_time_s": float(sum(e.wait_s for e in used)),
            "read_time_s": float(sum(e.read_s for e in used)),
        }

    # ------------------------------------------------------------------ host tier
    def _read(self, rec: _Record, block: Optional[ArenaBlock] = None) -> PagedAdapter:
        """Read ``rec``'s weights file into ``block`` of the arena (one taken now where none is given and the
        arena has room), else into host tiles of their own (pinned host memory on GPU); any thread. Raises
        AdapterError saying why it failed."""
        t0 = self._read_begins()
        nbytes = 0
        size = self._plan_bytes(rec)
        if block is None:
            block = self._late_block(size)
        # One read alone is split over threads (one reaches ~2.2 GB/s); many at once share the cores.
        threads = max(1, min(MAX_THREADS_PER_READ, (os.cpu_count() or 1) // max(1, self._reads_active)))
        try:
            procs = self._procs if self._procs_state == "ready" else None
            paged = None
            if procs is not None:
                try:
                    paged, nbytes = procs.read(rec.plan, self.cfg, self.layout, self.econf.max_lora_rank,
                                               self._dtype, size, block, self._copy_out, threads)
                except OSError as e:  # its buffer could not grow (shared memory full): this one on a thread
                    _log.warning("adapter %r read on a thread: %s", rec.name, e)
            if paged is None:
                if block is not None:
                    out = self._arena.view(block)
                else:
                    out = self._tile_buffer(rec) if self._host_copies else None
                paged, nbytes = read_paged_adapter(rec.plan, self.cfg, self.layout, self.econf.max_lora_rank,
                                                   self._dtype, out, threads)
                if block is not None:
                    if not np.shares_memory(paged.tiles, out):
                        raise AdapterError(f"internal: arena block of {block.size} bytes is smaller than the "
                                           f"adapter's tiles ({paged.tiles.nbytes} bytes)")
                elif out is not None:
                    paged.tiles = self._copy_out(paged.tiles)
                else:
                    paged.tiles = self._wait_host(self._to_host(paged.tiles))
        except BaseException as e:  # Ctrl-C in an eager registration too: the block goes back
            if block is not None:
                self._arena.free(block)
            self._read_ends(t0, nbytes, failed=True)
            if isinstance(e, AdapterError) or not isinstance(e, Exception):
                raise
            # an I/O or memory error: this adapter fails, with what happened
            raise AdapterError(f"reading adapter {rec.name!r} from {rec.path} failed: {type(e).__name__}: {e}") from e
        if block is not None:
            self._keep_block(paged, block)
        self._read_ends(t0, nbytes, failed=False)
        return paged

    def _arena_block(self, nbytes: int) -> Optional[ArenaBlock]:
        """A block of the arena for ``nbytes`` of tiles, the least recently used adapters of the host tier
        making room (under the store's lock, held by the caller). None without an arena, or where adapters
        being read or uploaded hold the room: the reader then tries once more (``_late_block``)."""
        if self._arena is None or nbytes > self._arena.size:
            return None
        block = self._arena.alloc(nbytes)
        evicted = 0
        # Least recently used first, wherever they lie: with adapters of mixed sizes a run large enough may take
        # a few, but not the whole tier (copies still being uploaded free their blocks only later).
        while block is None and evicted < 4 * nbytes:
            victim = next((n for n in self._host if id(self._host[n].tiles) in self._blocks
                           and not self._records[n].in_memory), None)
            if victim is None:
                break
            evicted += self._host[victim].nbytes
            self._host_drop(victim)
            self.counters["host_evictions"] += 1
            block = self._arena.alloc(nbytes)
        return block

    def _late_block(self, nbytes: int) -> Optional[ArenaBlock]:
        """On a reader's thread, without the store's lock (the engine thread may hold it while it waits for this
        read): a block once the uploads from freed blocks are done; None, and the tiles are copied into the host
        tier as without an arena."""
        if self._arena is None or nbytes > self._arena.size:
            return None
        self._arena.wait_deferred()
        return self._arena.alloc(nbytes)

    def _drop_result(self, fut: Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._release_tiles(fut.result())

    def _keep_block(self, paged: PagedAdapter, block: ArenaBlock) -> None:
        with self._blocks_lock:
            self._blocks[id(paged.tiles)] = (paged.tiles, block)

    def _release_tiles(self, paged: PagedAdapter) -> None:
        """``paged`` leaves the store: its arena block (if any) is given back."""
        with self._blocks_lock:
            kept = self._blocks.pop(id(paged.tiles), None)
        if kept is not None:
            self._arena.free(kept[1])

    def _copy_out(self, tiles: np.ndarray):
        """The host tier's copy of ``tiles``, which lie in a buffer the next read reuses."""
        host = self._to_host(tiles)
        if _aliases(host, tiles):  # the host tier kept the array itself: copy it
            host = self._to_host(np.array(tiles))
        return self._wait_host(host)

    @staticmethod
    def _wait_host(host):
        block = getattr(host, "block_until_ready", None)
        if block is not None:
            block()  # the copy into pinned memory is part of the read, not of the engine's step
        return host

    def _start_readers(self, slot_bytes: int) -> None:
        """With adapter_readers="processes", start the reader processes in the background, once (at the first
        registration): they take seconds to import the package, and reads run on threads meanwhile."""
        with self._procs_lock:
            if self.econf.adapter_readers != "processes" or self._procs_state != "off":
                return
            self._procs_state = "starting"

        def run():
            procs = read_processes.start(self._read_workers, slot_bytes, arena=self._arena)
            with self._procs_lock:
                if self._procs_state == "closed":
                    if procs is not None:
                        procs.close()
                    return
                self._procs = procs
                self._procs_state = "ready" if procs is not None else "unavailable"

        self._procs_thread = threading.Thread(target=run, name="adapter-readers-start", daemon=True)
        self._procs_thread.start()

    def wait_for_readers(self, timeout: Optional[float] = None) -> str:
        """Wait until the reader processes (if asked for) have started or failed to; returns ``reader_mode``."""
        thread = self._procs_thread
        if thread is not None:
            thread.join(timeout)
        return self.reader_mode

    @property
    def reader_mode(self) -> str:
        """Where background reads run now: "processes", or "threads" (asked for, not yet started, or unable
        to start: the warning says why)."""
        return "processes" if self._procs_state == "ready" else "threads"

    def _tile_buffer(self, rec: _Record) -> np.ndarray:
        """This reader thread's reusable byte buffer, large enough for ``rec``'s tiles."""
        size = self._plan_bytes(rec)
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.nbytes < size:
            buf = np.empty(size, np.uint8)
            self._scratch.buf = buf
        return buf

    def _read_begins(self) -> float:
        now = time.perf_counter()
        with self._stats_lock:
            if self._reads_active:
                self.counters["read_wall_s"] += now - self._reads_mark
            self._reads_mark = now
            self._reads_active += 1
        return now

    def _read_ends(self, t0: float, nbytes: int, failed: bool) -> None:
        now = time.perf_counter()
        c = self.counters
        with self._stats_lock:
            c["read_wall_s"] += now - self._reads_mark
            self._reads_mark = now
            self._reads_active -= 1
            c["load_read_s"] += now - t0
            c["read_bytes"] += nbytes
            c["reads"] += 1
            c["host_loads"] += 0 if failed else 1
            c["read_failures"] += 1 if failed else 0
            c["read_gbps"] = c["read_bytes"] / c["read_wall_s"] / 1e9 if c["read_wall_s"] else 0.0
            c["read_gbps_per_reader"] = c["read_bytes"] / c["load_read_s"] / 1e9 if c["load_read_s"] else 0.0

    def _plan_bytes(self, rec: _Record) -> int:
        return (rec.num_pages or 0) * self.layout.bytes_per_page(np.dtype(self._dtype).itemsize)

    def _read_async(self, rec: _Record) -> None:
        if rec.name in self._reading or rec.in_memory or rec.name in self._read_failed:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=self._read_workers, thread_name_prefix="adapter-read")
        # The block is taken now, on the engine's thread: making room may drop host copies, which needs the lock.
        block = self._arena_block(self._plan_bytes(rec))
        self._reading[rec.name] = (rec, self._reader.submit(self._read, rec, block))

    def _raise_if_failed(self, name: str) -> None:
        reason = self._read_failed.get(name)
        if reason is not None:
            raise AdapterError(f"adapter {name!r} could not be read: {reason} (unload it and load it again "
                               "once its files are fixed)")

    def close(self) -> None:
        """Stop the reader threads (reads not started are dropped) and drop the host copies."""
        with self._lock:
            reader, self._reader = self._reader, None
            self._reading.clear()
            for name in list(self._host):
                self._host_drop(name)
        if reader is not None:
            reader.shutdown(wait=False, cancel_futures=True)
        with self._procs_lock:
            procs, self._procs = self._procs, None
            self._procs_state = "closed"
        if procs is not None:
            procs.close()
        if self._arena is not None:
            with self._lock:
                self._shared.clear()  # their views of the arena go, so that its memory goes with it
            with self._blocks_lock:
                self._blocks.clear()
            self._arena.close()

    def wait_reads(self, timeout: Optional[float] = None) -> None:
        """Block until the background disk reads under way now are done (they join the host tier at the
        next step)."""
        for _, fut in list(self._reading.values()):
            try:
                fut.exception(timeout=timeout)
            except Exception:  # a timeout: the caller only wanted to wait that long
                return

    def _collect_reads(self) -> None:
        """Move finished background reads into the host tier (on the engine thread)."""
        with self._lock:
            for name, (rec, fut) in list(self._reading.items()):
                if fut.done():
                    self._finish_read(rec, fut)

    def _finish_read(self, rec: _Record, fut: Future) -> Optional[PagedAdapter]:
        """Record a finished read of ``rec`` (under the lock): into the host tier, or marked failed."""
        if self._reading.get(rec.name, (None,))[0] is rec:
            del self._reading[rec.name]
        err = fut.exception()
        if self._records.get(rec.name) is not rec:
            if err is None:
                self._release_tiles(fut.result())
            return None  # unloaded (or replaced) while it was being read
        if err is not None:
            self._read_failed[rec.name] = str(err)  # not retried; its requests report it
            return None
        paged = fut.result()
        self._host_put(rec.name, paged)
        return paged

    def _describe(self, rec: _Record, lora, paged: Optional[PagedAdapter] = None) -> None:
        rec.rank = int(lora.rank)
        rec.targets = tuple(lora.target_modules)
        rec.ranks = {m: int(ml.ranks.max()) for m, ml in lora.modules.items()}
        if paged is not None:
            rec.num_pages = paged.num_pages

    def _host_get(self, rec: _Record) -> PagedAdapter:
        """The host copy of ``rec``, read now if need be: by a reader thread, this one waiting for it."""
        with self._lock:
            paged = self._host.get(rec.name)
            if paged is not None:
                self._host.move_to_end(rec.name)
                return paged
            self._raise_if_failed(rec.name)
            self._read_async(rec)
            fut = self._reading[rec.name][1]
        fut.exception()  # wait outside the lock: the reader threads' results are collected under it
        with self._lock:
            paged = self._finish_read(rec, fut)
            self._raise_if_failed(rec.name)
        if paged is None:  # unloaded while it was read
            raise UnknownAdapterError(f"adapter {rec.name!r} was unloaded while it was being read")
        return paged

    def _host_put(self, name: str, paged: PagedAdapter) -> None:
        self._host_drop(name)
        self._host[name] = paged
        key = id(paged.tiles)
        users = self._tile_users.get(key, 0)
        if users == 0:
            self._host_bytes += paged.nbytes
        self._tile_users[key] = users + 1
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
            key = id(paged.tiles)
            users = self._tile_users.get(key, 1) - 1
            if users <= 0:
                self._tile_users.pop(key, None)
                self._host_bytes -= paged.nbytes
                self._release_tiles(paged)
            else:
                self._tile_users[key] = users
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
