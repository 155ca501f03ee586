"""UnifiedPagePool: one statically allocated device buffer shared by the KV cache and LoRA weights.

Layout
------
``buffer``: ``[L, P, R, W]`` in the engine dtype, allocated once at start-up.

* ``L`` layers, ``P`` pages, ``R = page_rows`` rows per page, ``W = num_kv_heads * head_dim`` (the K/V
  width of one token in one layer). A page id ``p`` names ``buffer[:, p]``: the same page in every layer,
  so one allocation serves a whole request or adapter and index tables are layer independent.
* **KV cache.** A request's tokens form blocks of ``R`` tokens; block ``b`` takes one K page and one V page:
  ``buffer[l, k_page, i]`` is token ``b*R+i``'s K (heads-major ``[Nkv, D]``).
* **LoRA weights.** For adapter slot ``s`` and projection ``m`` (``y[T, d_out] = x[T, d_in] @ W``),
  ``A^T`` is ``[r, d_in]`` and ``B`` is ``[r, d_out]``. ``d_in`` is cut into ``ceil(d_in/W)`` column chunks
  and the rank into ``ceil(r/R)`` row blocks; tile ``(c, j)`` of ``A^T`` lives in page ``a_pages[s, m, c, j]``,
  likewise for ``B``. Tiles are what the kernels load: one ``[R, W]`` page is one operand tile.

Why the width is the K/V width and not the hidden size (the original S-LoRA layout): with GQA,
``W_kv < H`` and a page of width ``H`` would leave ``1 - W_kv/H`` of every KV page empty (75% for
Llama-3-8B). Any width the projections need (``H = G * W_kv`` for q/o, the intermediate size for MLP
adapters) is a whole number of W-chunks, up to rounding of the last chunk.

Waste bound (stated, and asserted in the tests)
-----------------------------------------------
* KV: fewer than ``R`` token rows per request (its last, partly filled block), as in vLLM.
* Adapters: for each (projection, A or B) at most ``R - 1`` padding rows of the rank (ranks that are
  multiples of ``R`` waste none) and less than ``W`` padding columns of the last chunk of ``d``
  (none when ``W`` divides ``d``; 10.6% of an 11008-wide MLP row at W=4096, 0% at W=1024).
  Adapters whose rank differs per layer (PEFT ``rank_pattern``) take the largest rank in every layer.
* No fragmentation by construction: every allocation is a set of whole, interchangeable pages.

Allocation is a free-list stack (``O(pages)`` to allocate or free); ``owner`` records who holds each page so
the invariants (no page owned twice, none lost, ``free + kv + adapter == total``) can be checked at any time.
Device writes go through jitted functions that donate the buffer, so no step ever copies the pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FREE = 0
KV = 1
ADAPTER = 2
_KIND_NAMES = {FREE: "free", KV: "kv", ADAPTER: "adapter"}


class PoolExhausted(RuntimeError):
    """Raised by ``alloc`` when not enough free pages remain; the scheduler prevents it from escaping."""


@dataclass(frozen=True)
class PoolLayout:
    """The static shape of the pool; the kernels and the engine agree on it through this object."""

    num_layers: int
    num_pages: int
    page_rows: int
    page_width: int
    # Devices the width is split over (tensor parallelism): each holds page_width/shards columns of every
    # page, and LoRA tiles are cut to that width (sharding.tensor_parallel says which slice each holds).
    shards: int = 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_pages, self.page_rows, self.page_width)

    @property
    def tile_width(self) -> int:
        """Columns of one LoRA tile: the width of a page on one device."""
        return self.page_width // self.shards

    def bytes_per_page(self, itemsize: int) -> int:
        return self.num_layers * self.page_rows * self.page_width * itemsize

    def chunks(self, width: int) -> int:
        return math.ceil(width / self.tile_width)

    def rank_blocks(self, rank: int) -> int:
        return math.ceil(rank / self.page_rows)

    def kv_pages_for(self, num_tokens: int) -> int:
        """Pages (K and V together) that hold ``num_tokens`` tokens of one request."""
        return 2 * math.ceil(num_tokens / self.page_rows)

    def adapter_pages_for(self, module_dims: list[tuple[int, int, int]]) -> int:
        """Pages for an adapter given (rank, d_in, d_out) of each adapted projection."""
        return sum(self.rank_blocks(r) * (self.chunks(di) + self.chunks(do)) for r, di, do in module_dims)


class UnifiedPagePool:
    """Host-side owner of every page of the device pool (the buffer itself lives in the engine's state)."""

    def __init__(self, layout: PoolLayout):
        self.layout = layout
        n = layout.num_pages
        # Free stack: pages [0, _top) of _stack are free. Page 0 is reserved as the harmless target of
        # unused index-table entries, so tables can be padded with 0 without aliasing anyone's data.
        self._stack = np.arange(n - 1, 0, -1, dtype=np.int32)
        self._top = n - 1
        self.owner = np.zeros(n, dtype=np.int8)
        self.owner[0] = -1  # reserved
        self._counts = {FREE: n - 1, KV: 0, ADAPTER: 0}

    # ---------------------------------------------------------------- allocation
    @property
    def total_pages(self) -> int:
        return self.layout.num_pages - 1  # usable pages (page 0 is reserved)

    @property
    def free_pages(self) -> int:
        return self._counts[FREE]

    @property
    def kv_pages(self) -> int:
        return self._counts[KV]

    @property
    def adapter_pages(self) -> int:
        return self._counts[ADAPTER]

    def can_alloc(self, n: int) -> bool:
        return n <= self._top

    def alloc(self, n: int, kind: int) -> np.ndarray:
        """Take ``n`` free pages for ``kind`` (KV or ADAPTER); returns their ids (int32)."""
        if kind not in (KV, ADAPTER):
            raise ValueError(f"unknown page kind {kind}")
        if n > self._top:
            raise PoolExhausted(f"asked for {n} pages, {self._top} free")
        pages = self._stack[self._top - n:self._top][::-1].copy()
        self._top -= n
        self.owner[pages] = kind
        self._counts[FREE] -= n
        self._counts[kind] += n
        return pages

    def free(self, pages: np.ndarray, kind: int) -> None:
        """Return pages to the free list; each must currently be held as ``kind``."""
        pages = np.asarray(pages, dtype=np.int32)
        if pages.size == 0:
            return
        if np.any(self.owner[pages] != kind) or np.unique(pages).size != pages.size:
            bad = pages[self.owner[pages] != kind]
            raise RuntimeError(f"freeing pages not held as {_KIND_NAMES[kind]}: {bad[:8].tolist()}")
        self.owner[pages] = FREE
        self._stack[self._top:self._top + pages.size] = pages
        self._top += pages.size
        self._counts[FREE] += pages.size
        self._counts[kind] -= pages.size

    def check_invariants(self) -> None:
        """Raise AssertionError if any page is lost, double-owned or miscounted."""
        free = self._stack[:self._top]
        assert np.unique(free).size == free.size, "a page is on the free list twice"
        assert np.all(self.owner[free] == FREE), "a free-listed page is owned"
        for kind in (FREE, KV, ADAPTER):
            assert int((self.owner == kind).sum()) == self._counts[kind], f"{_KIND_NAMES[kind]} count drifted"
        assert self._counts[FREE] == self._top
        assert self._counts[FREE] + self._counts[KV] + self._counts[ADAPTER] == self.total_pages

    def stats(self) -> dict:
        return {
            "total_pages": self.total_pages,
            "free_pages": self.free_pages,
            "kv_pages": self.kv_pages,
            "adapter_pages": self.adapter_pages,
            "pool_utilization": 1.0 - self.free_pages / max(self.total_pages, 1),
        }


def pages_for_budget(budget_bytes: int, layout_wo_pages: PoolLayout, itemsize: int) -> int:
    """How many pages fit in ``budget_bytes`` (at least 2)."""
    return max(2, int(budget_bytes // layout_wo_pages.bytes_per_page(itemsize)))
