"""Cutting LoRA weights into pool pages, and the per-slot index tables the kernels read.

See ``slora_jax.memory.pool`` for the page layout. An adapter becomes ``tiles [L, n, R, W]`` (n pages, all
layers) plus, for each LoRA group, which of its n pages holds tile (module, chunk, rank block) of A and B.
Placing it on the device maps those local indices to the pool pages it was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from slora_jax.config import ModelConfig
from slora_jax.memory.pool import PoolLayout
from slora_jax.model.llama import LORA_GROUPS, group_dims
from sharding import TensorParallelLayout


@dataclass
class GroupTiles:
    a_idx: np.ndarray  # [M, CHin, RB] int32 index into the adapter's pages (-1 = unused)
    b_idx: np.ndarray  # [M, CHout_max, RB]
    ranks: np.ndarray  # [L, M] int32
    scales: np.ndarray  # [L, M] float32


@dataclass
class PagedAdapter:
    """An adapter in page form, ready to be copied into any n free pages of the pool.

    ``transposed`` marks pages held as their tile's transpose: the page's R*W values, read as [W, R], are
    the tile's [R, W]. The reader keeps B's tiles so because B is stored [d_out, r] and its tiles hold B^T:
    cutting B into [W, R] blocks copies runs of R values, where transposing it on the host copies one
    value at a time (its slowest step). ``canonical_tiles`` turns them round, on the device."""

    tiles: object  # [L, n, R, W] in the engine dtype: numpy, or a pinned-host jax array on GPU
    groups: dict[str, GroupTiles]
    num_pages: int
    transposed: Optional[np.ndarray] = None  # [n] bool; None: every page as the pool holds it

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.tiles.shape)) * self.tiles.dtype.itemsize


def _transpose_pages(tiles, mask):
    """tiles [L, n, R, W] with the pages in ``mask`` [n] turned from [W, R] into [R, W] (jax arrays)."""
    import jax.numpy as jnp

    L, n, R, W = tiles.shape
    turned = tiles.reshape(L, n, W, R).swapaxes(2, 3)
    return jnp.where(mask[None, :, None, None], turned, tiles)


_transpose_pages_jit = None


def canonical_tiles(tiles, transposed: Optional[np.ndarray]):
    """``tiles`` with every page as the pool holds it (see PagedAdapter.transposed). A jax array is turned
    on its device (asynchronously, one small program per page count); numpy is turned on the host."""
    if transposed is None or not transposed.any():
        return tiles
    L, n, R, W = tiles.shape
    if isinstance(tiles, np.ndarray):
        out = tiles.copy()
        out[:, transposed] = tiles[:, transposed].reshape(L, -1, W, R).swapaxes(2, 3)
        return out
    global _transpose_pages_jit
    if _transpose_pages_jit is None:
        import jax

        _transpose_pages_jit = jax.jit(_transpose_pages)
    return _transpose_pages_jit(tiles, transposed)


def _tile(w: np.ndarray, R: int, W: int, rb: int, ch: int) -> np.ndarray:
    """w [L, r, d] -> tiles [L, ch*rb, R, W], chunk-major (tile c*rb + j holds rows jR.., cols cW..)."""
    L, r, d = w.shape
    padded = np.zeros((L, rb * R, ch * W), dtype=np.float32)
    padded[:, :r, :d] = w
    t = padded.reshape(L, rb, R, ch, W).transpose(0, 3, 1, 2, 4)
    return t.reshape(L, ch * rb, R, W)


def empty_group(cfg: ModelConfig, layout: PoolLayout, group: str, rb_max: int) -> tuple[GroupTiles, int, tuple]:
    """A group's tiles with no module placed yet (every index -1, ranks and scales 0), its input chunks and
    its projections' output sizes on one device: what both adapter planners fill in."""
    d_in, outs = group_dims(cfg, group, layout.shards)
    M, ch_in = len(LORA_GROUPS[group]), layout.chunks(d_in)
    tiles = GroupTiles(np.full((M, ch_in, rb_max), -1, np.int32),
                       np.full((M, max(layout.chunks(o) for o in outs), rb_max), -1, np.int32),
                       np.zeros((cfg.num_layers, M), np.int32), np.zeros((cfg.num_layers, M), np.float32))
    return tiles, ch_in, outs


def shard_slices(cfg: ModelConfig, layout: PoolLayout, module: str) -> list[tuple[slice, slice]]:
    """For each device the pool's width is split over: (columns of A^T, columns of B) of a LoRA on
    ``module`` that it holds (``sharding.tensor_parallel``); one device holds all of both."""
    if layout.shards == 1:
        return [(slice(None), slice(None))]
    tpl = TensorParallelLayout(cfg, layout.shards)
    return [tpl.lora_slices(module, i) for i in range(layout.shards)]


def _tile_shards(w: np.ndarray, R: int, layout: PoolLayout, rb: int, ch: int, cols: list) -> np.ndarray:
    """w [L, r, d] -> tiles [L, ch*rb, R, W]: each device's columns ``cols[i]`` of w tiled at the tile
    width, side by side in the page's columns that device holds."""
    Wt = layout.tile_width
    parts = [_tile(w[..., c], R, Wt, rb, ch) for c in cols]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


def page_adapter(lora, cfg: ModelConfig, layout: PoolLayout, max_rank: int, dtype) -> PagedAdapter:
    """LoraWeights (host float32) -> PagedAdapter in ``dtype``."""
    R, W = layout.page_rows, layout.page_width
    rb_max = layout.rank_blocks(max_rank)
    tiles: list[np.ndarray] = []
    n = 0
    groups = {}
    for g, mods in LORA_GROUPS.items():
        gt, ch_in, outs = empty_group(cfg, layout, g, rb_max)
        a_idx, b_idx, ranks, scales = gt.a_idx, gt.b_idx, gt.ranks, gt.scales
        for i, m in enumerate(mods):
            ml = lora.modules.get(m)
            if ml is None:
                continue
            r = max(int(ml.ranks.max()), 1)  # modules of one adapter may have lower ranks than its max
            rb = layout.rank_blocks(r)
            ch_out = layout.chunks(outs[i])
            a_cols, b_cols = zip(*shard_slices(cfg, layout, m))
            tiles.append(_tile_shards(ml.a[:, :r], R, layout, rb, ch_in, a_cols))
            a_idx[i, :, :rb] = n + np.arange(ch_in * rb).reshape(ch_in, rb)
            n += ch_in * rb
            tiles.append(_tile_shards(ml.b[:, :r], R, layout, rb, ch_out, b_cols))
            b_idx[i, :ch_out, :rb] = n + np.arange(ch_out * rb).reshape(ch_out, rb)
            n += ch_out * rb
            ranks[:, i] = ml.ranks
            scales[:, i] = ml.scales
        groups[g] = gt
    all_tiles = np.concatenate(tiles, axis=1).astype(dtype) if tiles else np.zeros(
        (cfg.num_layers, 0, R, W), dtype)
    return PagedAdapter(all_tiles, groups, n)


class AdapterTables:
    """Host copies of the per-slot index tables; ``version`` changes whenever a slot changes."""

    def __init__(self, cfg: ModelConfig, layout: PoolLayout, num_slots: int, max_rank: int):
        self.num_slots = num_slots
        rb = layout.rank_blocks(max_rank)
        self.arrays: dict[str, tuple[np.ndarray, ...]] = {}
        for g, mods in LORA_GROUPS.items():
            d_in, outs = group_dims(cfg, g, layout.shards)
            M = len(mods)
            self.arrays[g] = (
                np.zeros((num_slots, M, layout.chunks(d_in), rb), np.int32),
                np.zeros((num_slots, M, max(layout.chunks(o) for o in outs), rb), np.int32),
                np.zeros((num_slots, cfg.num_layers, M), np.int32),
                np.zeros((num_slots, cfg.num_layers, M), np.float32),
            )
        self.version = 0

    def set_slot(self, slot: int, paged: PagedAdapter, pages: np.ndarray) -> None:
        for g, gt in paged.groups.items():
            a, b, r, s = self.arrays[g]
            # Unused table entries point at the reserved page 0: always a valid read, never used.
            a[slot] = np.where(gt.a_idx >= 0, pages[np.maximum(gt.a_idx, 0)], 0)
            b[slot] = np.where(gt.b_idx >= 0, pages[np.maximum(gt.b_idx, 0)], 0)
            r[slot] = gt.ranks
            s[slot] = gt.scales
        self.version += 1

    def clear_slot(self, slot: int) -> None:
        for a, b, r, s in self.arrays.values():
            a[slot] = 0
            b[slot] = 0
            r[slot] = 0
            s[slot] = 0
        self.version += 1
