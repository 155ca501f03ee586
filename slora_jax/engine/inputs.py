"""Device inputs of a step, built on the host from the scheduler's decision (numpy, shapes bucketed).

Every array is 32-bit (the runner packs them into one buffer, one host->device copy per step). Shapes
depend on buckets only, so a run compiles a bounded set of programs (``step_shapes``; with greedy and
sampling variants and two LoRA variants, 48 for a batch of 256 and 2048 tokens a step):
- decode: B rows, one token each (16, 32, 64, 96, 128, 192, 256, ...: powers of two and the steps half way
  between them from 64 on, where a padded row costs most; at most the batch bucket);
- mixed: T tokens (a power of two >= 128, at most the step's token budget): decode tokens first, then
  prompt chunks sorted by adapter (each adapter's prompt tokens one run, as MBGMM wants them); page
  tables and sampling rows N = min(T, batch bucket), decode token i being row i;
- prefill: scoring only (``Engine.logits``): whole prompts, self-attention within the step, nothing cached.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from slora_jax.engine.request import Request
from slora_jax.engine.scheduler import SchedulerOutput

DECODE_MIN_ROWS = 16
MIXED_MIN_TOKENS = 128


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def powers(lo: int, hi: int) -> list[int]:
    """Powers of two from lo to hi (both powers of two)."""
    out = [lo]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return out


def decode_buckets(rows: int) -> list[int]:
    """Decode batch sizes up to ``rows`` (a power of two): powers of two from 16, and 1.5x each from 64."""
    out = {b for b in powers(min(DECODE_MIN_ROWS, rows), rows)}
    out |= {3 * b // 2 for b in out if 64 <= b < rows}
    return sorted(out)


def fill_tables(k_pages: np.ndarray, v_pages: np.ndarray, reqs: list[Request], first_row: int = 0) -> None:
    """Rows first_row.. of the page tables get each request's K and V page ids, in three numpy operations
    rather than two slice assignments per request (a quarter of a 256-row decode step's host time)."""
    if not reqs:
        return
    counts = np.fromiter((len(r.k_pages) for r in reqs), np.int64, len(reqs))
    rows = np.repeat(np.arange(first_row, first_row + len(reqs)), counts)
    cols = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    k_pages[rows, cols] = np.concatenate([r.k_pages for r in reqs])
    v_pages[rows, cols] = np.concatenate([r.v_pages for r in reqs])


class StepInputs:
    """Builds each step's arrays for one engine (its page size, batch bucket and table width rule)."""

    def __init__(self, page_rows: int, max_batch_size: int, token_budget: int, table_width: Callable[[int], int],
                 slot_of: Callable[[Sequence[Optional[str]]], np.ndarray]):
        self.R = page_rows
        self.rows = bucket(max_batch_size, 2)  # rows of every token output (the chaining buffer)
        self.token_budget = token_budget
        self.table_width = table_width  # page-table columns for a longest request of n pages
        self.slot_of = slot_of  # adapter names -> device slots (-1: base)
        self._decode_buckets = decode_buckets(self.rows)

    # ------------------------------------------------------------------ shapes
    def decode_rows(self, n: int) -> int:
        return next(b for b in self._decode_buckets if b >= n)

    def mixed_tokens(self, n: int) -> int:
        return bucket(n, MIXED_MIN_TOKENS)

    def shapes(self, max_pages: int) -> list[tuple[str, int, int]]:
        """Every (mode, rows or tokens, table width) a generation step can take."""
        widths = sorted({self.table_width(p) for p in range(1, max_pages + 1)})
        decode = [("decode", B, w) for B in self._decode_buckets for w in widths]
        mixed = [("mixed", T, w) for T in powers(MIXED_MIN_TOKENS, self.mixed_tokens(self.token_budget))
                 for w in widths]
        return decode + mixed

    @staticmethod
    def decode_arrays(B: int, width: int) -> dict:
        return dict(tokens=np.zeros(B, np.int32), prev_rows=np.full(B, -1, np.int32),
                    positions=np.zeros(B, np.int32), token_slot=np.full(B, -1, np.int32),
                    k_rows=np.full(B, -1, np.int32), v_rows=np.full(B, -1, np.int32),
                    k_pages=np.zeros((B, width), np.int32), v_pages=np.zeros((B, width), np.int32),
                    lengths=np.zeros(B, np.int32))

    def mixed_arrays(self, T: int, width: int) -> dict:
        N = min(T, self.rows)
        return dict(tokens=np.zeros(T, np.int32), prev_rows=np.full(T, -1, np.int32),
                    positions=np.zeros(T, np.int32), k_rows=np.full(T, -1, np.int32),
                    v_rows=np.full(T, -1, np.int32), token_row=np.full(T, -1, np.int32),
                    slot_prefill=np.full(T, -1, np.int32), slot_decode=np.full(N, -1, np.int32),
                    k_pages=np.zeros((N, width), np.int32), v_pages=np.zeros((N, width), np.int32),
                    lengths=np.zeros(N, np.int32), last_index=np.zeros(N, np.int32))

    # ------------------------------------------------------------------ a step
    def build(self, sched: SchedulerOutput, prev_row: dict) -> tuple[str, dict, dict, list]:
        """(mode, inputs, sampling arrays, rows) of a scheduled step. ``prev_row``: id(request) -> its row in
        the step still on the device, for requests whose input token is that step's output. ``rows``:
        (request, samples) per sampling row, in row order."""
        # Chunks sorted by adapter slot (stable): each adapter's prompt tokens one run, as MBGMM wants them.
        chunk_slots = self.slot_of([c.req.adapter for c in sched.chunks])
        order = np.argsort(chunk_slots, kind="stable")
        chunks, slots = [sched.chunks[i] for i in order], chunk_slots[order]
        decode = sched.decode
        reqs = decode + [c.req for c in chunks]
        width = self.table_width(max(len(r.k_pages) for r in reqs))
        if not chunks:
            B = self.decode_rows(len(decode))
            inp = self.decode_arrays(B, width)
            self._decode_tokens(inp, decode, prev_row, slot_key="token_slot")
            rows = [(r, True) for r in decode]
            return "decode", inp, self.sampling(decode, B, ahead=[r.pending - 1 for r in decode]), rows
        T = self.mixed_tokens(sched.num_tokens)
        inp = self.mixed_arrays(T, width)
        self._decode_tokens(inp, decode, prev_row, slot_key="slot_decode")
        R = self.R
        off = len(decode)
        last = inp["last_index"]
        last[:len(decode)] = np.arange(len(decode))
        for j, c in enumerate(chunks):
            row = len(decode) + j
            r = c.req
            sl = slice(off, off + c.count)
            pos = np.arange(c.start, c.start + c.count, dtype=np.int32)
            inp["tokens"][sl] = r.tokens(c.start, c.start + c.count)
            inp["positions"][sl] = pos
            inp["token_row"][sl] = row
            inp["slot_prefill"][sl] = slots[j]
            inp["k_rows"][sl] = r.k_pages[pos // R] * R + pos % R
            inp["v_rows"][sl] = r.v_pages[pos // R] * R + pos % R
            inp["k_pages"][row, :len(r.k_pages)] = r.k_pages
            inp["v_pages"][row, :len(r.v_pages)] = r.v_pages
            last[row] = off + c.count - 1
            off += c.count
        if chunks:
            # Tail padding joins the last chunk's run of slots (its LoRA output is never read): MBGMM then
            # sees at most one run per adapter plus the decode tokens' -1 run.
            inp["slot_prefill"][off:] = slots[-1]
        rows = [(r, True) for r in decode] + [(c.req, c.samples) for c in chunks]
        ahead = [r.pending - 1 for r in decode] + [0] * len(chunks)
        samp = self.sampling([r for r, _ in rows], len(last), ahead=ahead)
        return "mixed", inp, samp, rows

    def _decode_tokens(self, inp: dict, decode: list[Request], prev_row: dict, slot_key: str) -> None:
        """The decode tokens' entries: token i of the step is request i's newest token, at position
        ``computed - 1`` (the scheduler advanced ``computed`` already), read from the device when pending."""
        n = len(decode)
        if n == 0:
            return
        R = self.R
        pos = np.fromiter((r.computed - 1 for r in decode), np.int32, n)
        k_pages, v_pages = inp["k_pages"], inp["v_pages"]
        fill_tables(k_pages, v_pages, decode)
        for i, r in enumerate(decode):
            row = prev_row.get(id(r), -1) if r.pending > 1 else -1
            if row >= 0:
                inp["prev_rows"][i] = row
            else:
                inp["tokens"][i] = r.last_token
        rows = np.arange(n)
        inp["positions"][:n] = pos
        inp[slot_key][:n] = self.slot_of([r.adapter for r in decode])
        inp["k_rows"][:n] = k_pages[rows, pos // R] * R + pos % R
        inp["v_rows"][:n] = v_pages[rows, pos // R] * R + pos % R
        inp["lengths"][:n] = pos + 1

    @staticmethod
    def sampling(reqs: list[Request], n: int, ahead: Optional[list[int]] = None) -> dict:
        """Sampling parameters of ``reqs`` padded to ``n`` rows. ``ahead``: tokens of each request sampled
        on the device before this row's (its counter, which keys a seeded draw, moves past them)."""
        pad = n - len(reqs)
        sp = [r.sampling for r in reqs]
        ahead = ahead if ahead is not None else [0] * len(reqs)
        return dict(
            temperature=np.pad(np.array([s.temperature for s in sp], np.float32), (0, pad)),
            top_p=np.pad(np.array([s.top_p for s in sp], np.float32), (0, pad), constant_values=1.0),
            top_k=np.pad(np.array([s.top_k for s in sp], np.int32), (0, pad)),
            seeds=np.pad(np.array([r.seed for r in reqs], np.uint32), (0, pad)),
            counters=np.pad(np.array([len(r.output) + a for r, a in zip(reqs, ahead)], np.int32), (0, pad)),
        )

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def prefill_arrays(T: int, rows: int) -> dict:
        return dict(tokens=np.zeros(T, np.int32), positions=np.zeros(T, np.int32),
                    token_slot=np.full(T, -1, np.int32), segment_ids=np.full(T, -1, np.int32),
                    k_rows=np.full(T, -1, np.int32), v_rows=np.full(T, -1, np.int32),
                    last_index=np.zeros(rows, np.int32))

    def scoring(self, reqs: list[Request]) -> dict:
        """Whole contexts, one segment each, nothing written to the pool (``Engine.logits``)."""
        T = bucket(sum(r.context_len for r in reqs), 16)
        inp = self.prefill_arrays(T, bucket(len(reqs)))
        slots = self.slot_of([r.adapter for r in reqs])
        off = 0
        for i, r in enumerate(reqs):
            n = r.context_len
            sl = slice(off, off + n)
            inp["tokens"][sl] = r.context
            inp["positions"][sl] = np.arange(n, dtype=np.int32)
            inp["token_slot"][sl] = slots[i]
            inp["segment_ids"][sl] = i
            inp["last_index"][i] = off + n - 1
            off += n
        return inp
