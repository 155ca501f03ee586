"""Pieces the paged attention kernels share: the token -> pool-row lookup and one online-softmax key block."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels import _backend

NEG = -1e30  # finite "minus infinity": exp(NEG - m) underflows to 0 without inf - inf = NaN


class PagedHeads:
    """What the paged attention ops derive from their sizes (mixed into their frozen dims dataclasses)."""

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def capacity(self) -> int:
        """Tokens a request's page table can hold."""
        return self.num_blocks * self.page_rows


def pool_rows(pages_ref, row, tok, *, page_rows: int, num_blocks: int, num_pages: int):
    """[BT, 1] flat pool rows (page * R + i) of tokens ``tok`` [BT] of the request in row ``row`` of a page
    table; ids are clipped into range (tokens past the table read its last entry and are masked by callers)."""
    page = jnp.clip(pages_ref[row, jnp.minimum(tok // page_rows, num_blocks - 1)], 0, num_pages - 1)
    return (page * page_rows + tok % page_rows)[:, None]


def softmax_block(carry, q, k_view, v_view, ok, keys_ok, *, sm_scale: float, precision):
    """Fold one block of keys into an online softmax.

    carry (o [Q, D], m [Q], l [Q]) float32; q [Q, D]; k_view / v_view: [BT, D] pool views to load; ok [Q, BT]
    (or [1, BT]) which query attends which key; keys_ok [BT] which keys may be loaded at all."""
    o, m, l = carry
    k = _backend.load(k_view, mask=keys_ok[:, None], other=0)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
    s = jnp.where(ok, s * sm_scale, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
    v = _backend.load(v_view, mask=keys_ok[:, None], other=0)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    return alpha[:, None] * o + pv, m_new, alpha * l + jnp.sum(p, axis=1)
