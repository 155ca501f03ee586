"""Reading a PEFT adapter's weights straight into the page-tile layout of the unified pool.

``plan_adapter`` works out, from adapter_config.json alone, which pages an adapter takes and where each
module's A and B tiles lie among them (the same layout as ``paging.page_adapter``), so the engine knows an
adapter's size without reading its weights. ``read_paged_adapter`` then reads adapter_model.safetensors
tensor by tensor into a small per-thread buffer and copies each tensor once, cast and tiled, into the
adapter's tile array: no float32 copy of the adapter, no padded intermediates, no per-tensor Python arrays
beyond views.

The file is read with ``pread`` rather than memory-mapped: a file truncated or replaced while it is mapped
kills the process with SIGBUS on the next access, whereas a short read fails only this adapter. The
kernel's copy out of the page cache releases the GIL, as do the numpy copies, so several reader threads
read in parallel.
"""

from __future__ import annotations

import functools
import math
import mmap
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from slora_jax.adapters.paging import GroupTiles, PagedAdapter, empty_group, shard_slices
from slora_jax.adapters.peft import (WEIGHTS_FILE, config_ranks, match_tensors, module_scale,
                                     validated_config)
from slora_jax.config import MODULES, ModelConfig
from slora_jax.errors import AdapterError
from slora_jax.memory.pool import PoolLayout
from slora_jax.model.checkpoint import SAFETENSORS_NUMPY, pread_into, read_safetensors_header
from slora_jax.model.llama import LORA_GROUPS

# (same-size unsigned type, all-ones exponent) of each float format: with the sign bit cleared, a value is
# NaN or Inf exactly when its bits, read as an unsigned integer, are >= the all-ones exponent.
_EXPONENT = {"BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00), "F32": (np.uint32, 0x7F800000),
             "F64": (np.uint64, 0x7FF0000000000000)}
_TAG = {v: k for k, v in SAFETENSORS_NUMPY.items()}  # a float format's safetensors tag, for _finite_error
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {2: np.int16, 4: np.int32, 8: np.int64}


@dataclass(frozen=True)
class ModulePlace:
    """Where one module's tiles start among the adapter's pages (A: ch_in*rb tiles, then B: ch_out*rb)."""

    a0: int
    b0: int
    ch_in: int
    ch_out: int
    rb: int  # rank blocks of this module (its largest rank over layers, in page rows)


@dataclass
class AdapterPlan:
    """An adapter's page layout, from its config alone."""

    adapter_dir: str
    config: dict  # adapter_config.json as saved
    cfg: dict  # the same with peft's defaults filled in
    groups: dict[str, GroupTiles]
    num_pages: int
    rank: int  # largest rank over modules and layers
    ranks: dict[str, int]  # module -> its largest rank
    targets: tuple[str, ...]  # adapted modules, in MODULES order
    places: dict[str, ModulePlace]
    layer_ranks: dict  # (layer, module) -> (module key, rank, alpha): what the weights file must hold
    b_pages: np.ndarray  # [num_pages] bool: the pages of B tiles, which the reader keeps transposed

    @property
    def weights_path(self) -> Path:
        return Path(self.adapter_dir) / WEIGHTS_FILE


def plan_adapter(adapter_dir, model_config: ModelConfig, layout: PoolLayout, max_rank: int,
                 dtype="float32") -> AdapterPlan:
    """Validate adapter_config.json for an engine computing in ``dtype`` (AdapterError otherwise) and lay the
    adapter out in pages."""
    raw, cfg = validated_config(adapter_dir, model_config, max_rank, dtype)
    per_layer = config_ranks(cfg, model_config)  # (layer, module) -> (rank, alpha)
    L = model_config.num_layers
    mod_rank: dict[str, int] = {}
    for (_, m), (_, r, _) in per_layer.items():
        mod_rank[m] = max(mod_rank.get(m, 0), r)
    rb_max = layout.rank_blocks(max_rank)
    groups, places, n = {}, {}, 0
    for g, mods in LORA_GROUPS.items():
        gt, ch_in, outs = empty_group(model_config, layout, g, rb_max)
        a_idx, b_idx, ranks, scales = gt.a_idx, gt.b_idx, gt.ranks, gt.scales
        for i, m in enumerate(mods):
            if m not in mod_rank:
                continue
            rb = layout.rank_blocks(mod_rank[m])
            ch_out = layout.chunks(outs[i])
            a_idx[i, :, :rb] = n + np.arange(ch_in * rb).reshape(ch_in, rb)
            b_idx[i, :ch_out, :rb] = n + ch_in * rb + np.arange(ch_out * rb).reshape(ch_out, rb)
            places[m] = ModulePlace(n, n + ch_in * rb, ch_in, ch_out, rb)
            n += (ch_in + ch_out) * rb
            for layer in range(L):
                if (layer, m) in per_layer:
                    _, r, alpha = per_layer[(layer, m)]
                    ranks[layer, i] = r
                    scales[layer, i] = module_scale(cfg, r, alpha)
        groups[g] = gt
    targets = tuple(m for m in MODULES if m in mod_rank)
    b_pages = np.zeros(n, bool)
    for place in places.values():
        b_pages[place.b0:place.b0 + place.ch_out * place.rb] = True
    return AdapterPlan(str(adapter_dir), raw, cfg, groups, n, max(mod_rank.values()), mod_rank, targets, places,
                       per_layer, b_pages)


_staging = threading.local()
_threads: tuple = (0, None)  # (size, ThreadPoolExecutor) that reads parts of one adapter
_threads_lock = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    """Threads that read parts of one adapter (shared by all reads of the process; grown to ``n``)."""
    global _threads
    with _threads_lock:
        if _threads[0] < n:
            old = _threads[1]
            _threads = (n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="adapter-read-part"))
            if old is not None:  # its reads under way finish; its threads then end
                old.shutdown(wait=False)
        return _threads[1]


# Bytes a reader thread reads at once (a batch of layers of one module): small enough that the batch is still
# in the core's cache when it is checked for NaN/Inf and copied into the tiles, so the file's bytes cross
# memory about as often as in a plain read (once out of the page cache, once into the tiles).
_BATCH_BYTES = 1 << 20
# Bytes checked for NaN/Inf at once (both of the check's reductions read a chunk while it is in L1/L2).
_CHECK_BYTES = 256 << 10


def _staging_buffer(nbytes: int) -> np.ndarray:
    """A per-thread byte buffer of at least ``nbytes``, reused across reads."""
    buf = getattr(_staging, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1 << 20), np.uint8)
        _staging.buf = buf
    return buf


def _finite_error(raw: np.ndarray, dtype_tag: str) -> bool:
    """True when some value in ``raw`` (the bytes of ``dtype_tag`` floats) is NaN or Inf.

    Two integer max-reductions per chunk and no temporary: read as unsigned, a negative NaN/Inf is
    >= sign | exponent (no finite value is); read as signed, a positive NaN/Inf is >= exponent (negatives
    are < 0). numpy's reductions over integers are vectorised and release the GIL; a float isfinite on
    ml_dtypes' bfloat16 is a scalar loop, and masking the sign off first writes a temporary."""
    utype, exponent = _EXPONENT[dtype_tag]
    u = raw.view(utype)
    signed = _INT[u.itemsize]
    negative = utype(exponent | (1 << (8 * u.itemsize - 1)))
    step = max(_CHECK_BYTES // u.itemsize, 1)
    for i in range(0, u.size, step):
        part = u[i:i + step]
        if part.max() >= negative or part.view(signed).max() >= exponent:
            return True
    return False


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14; Python 3.11 lacks the name


def _new_zeros(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A zeroed array in memory new to the process, its pages mapped in one call: touching fresh pages one
    4 KiB fault at a time made writing the tiles cost twice what the read did. Transparent huge pages where
    the kernel gives them on request (THP "madvise", the common default): the kernel then maps and zeroes
    2 MiB at a time, which took this half the time of MAP_POPULATE's 4 KiB pages (numpy's own large
    allocations ask for huge pages too, so np.fromfile has them)."""
    size = math.prod(shape) * dtype.itemsize
    flags = getattr(mmap, "MAP_POPULATE", None)
    if flags is None or size < (1 << 20):
        return np.zeros(shape, dtype)
    try:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass  # no THP: the populate below maps 4 KiB pages, as MAP_POPULATE does
        try:
            mm.madvise(_MADV_POPULATE_WRITE)
        except OSError:  # an older kernel: map it populated from the start (no huge pages then)
            mm.close()
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    except (OSError, ValueError):
        return np.zeros(shape, dtype)
    return np.frombuffer(mm, dtype).reshape(shape)  # anonymous memory is zero; freed with the array


def _tile_layers(dest: np.ndarray, layers, m: np.ndarray, W: int) -> None:
    """Write m [n, r, d] (one module's A in n layers) into dest [L, ch, rb*R, W] (that module's
    tiles in every layer) at ``layers``: tile (c, j) of a layer holds rows jR.. and columns cW.. of its
    matrix, as ``paging._tile`` lays them out. Padding is left as it is."""
    n, r, d = m.shape
    full = d // W
    if full:
        dest[layers, :full, :r, :] = m[:, :, :full * W].reshape(n, r, full, W).transpose(0, 2, 1, 3)
    if d > full * W:
        dest[layers, full, :r, :d - full * W] = m[:, :, full * W:]


def _tile_layers_b(dest: np.ndarray, layers, m: np.ndarray, W: int, R: int) -> None:
    """Write B as stored, m [n, d_out, r] (n layers), into dest [L, ch, rb, W, R] (that module's B pages in
    every layer, each held as [W, R], see PagedAdapter.transposed): page (c, j) holds rows cW.. and
    columns jR.. of B, i.e. the transpose of B^T's tile (c, j). Runs of R values are copied. Padding is
    left as it is."""
    n, d, r = m.shape
    full = d // W
    first = 0
    blocks = r // R
    if blocks and m.dtype == dest.dtype:
        # Each run of R values as one opaque item: one copy for all full rank blocks, whose inner loop
        # goes over W items instead of over R values W*blocks times (numpy's loop overhead per run of R
        # values was most of this copy's cost).
        run = np.dtype((np.void, R * m.itemsize))
        dv = dest[:, :, :blocks].view(run)[..., 0]  # [L, ch, blocks, W]
        mv = m[..., :blocks * R].view(run)  # [n, d, blocks]
        if full:
            dv[layers, :full] = mv[:, :full * W].reshape(n, full, W, blocks).transpose(0, 1, 3, 2)
        if d > full * W:
            dv[layers, full, :, :d - full * W] = mv[:, full * W:].transpose(0, 2, 1)
        first = blocks
    for j in range(first, dest.shape[2]):
        lo, hi = j * R, min((j + 1) * R, r)
        if hi <= lo:
            break
        if full:
            dest[layers, :full, j, :, :hi - lo] = m[:, :full * W, lo:hi].reshape(n, full, W, hi - lo)
        if d > full * W:
            dest[layers, full, j, :d - full * W, :hi - lo] = m[:, full * W:, lo:hi]


@dataclass
class _Region:
    """One module's A or B tiles in every layer, as the batches of its tensors are copied into them."""

    is_b: bool
    parts: list  # per device: (tile columns of dest, the matrix's columns/rows that device holds)
    tile: object  # _tile_layers or _tile_layers_b, bound to the tile width
    layers: set  # layers whose tensor is in the file
    shapes: set  # shapes of those tensors
    covered: bool = True  # every value of the region is written by some tensor (no padding to zero)

    def zero_padding(self, num_layers: int, R: int) -> None:
        """Zero what the tensors will not write (a reused buffer holds another adapter's bytes there)."""
        if self.covered:
            return
        if len(self.layers) != num_layers or len(self.shapes) != 1:
            for part, _ in self.parts:  # layers left out, or ranks that differ by layer: all of it
                part.view(_UINT[part.itemsize])[...] = 0
            return
        (shape,) = self.shapes
        width, rank = shape if self.is_b else shape[::-1]
        for part, cols in self.parts:
            part = part.view(_UINT[part.itemsize])
            ch, W = part.shape[1], part.shape[-2 if self.is_b else -1]
            d = len(range(width)[cols])
            last = d - (ch - 1) * W  # columns (A) or rows (B) of the last chunk that the matrix fills
            if self.is_b:  # [L, ch, rb, W, R]
                j = rank // R
                if rank % R:
                    part[:, :, j, :, rank - j * R:] = 0
                    j += 1
                part[:, :, j:] = 0
                if last < W:
                    part[:, ch - 1, :, last:, :] = 0
            else:  # [L, ch, rb*R, W]
                part[:, :, rank:, :] = 0
                if last < W:
                    part[:, ch - 1, :, last:] = 0


def _regions(plan: AdapterPlan, batches: dict, model_config: ModelConfig, layout: PoolLayout,
             tiles: np.ndarray) -> dict[tuple[str, bool], _Region]:
    """(module, is B) -> its _Region: where in ``tiles`` its tensors go, and whether they fill it."""
    R, W, L = layout.page_rows, layout.page_width, model_config.num_layers
    Wt = layout.tile_width
    regions: dict[tuple[str, bool], _Region] = {}
    for (module, is_b, _, shape), groups in batches.items():
        region = regions.get((module, is_b))
        place = plan.places[module]
        first, ch = (place.b0, place.ch_out) if is_b else (place.a0, place.ch_in)
        if region is None:
            dest = tiles[:, first:first + ch * place.rb]
            dest = dest.reshape(L, ch, place.rb, W, R) if is_b else dest.reshape(L, ch, place.rb * R, W)
            parts = []
            for shard, (a_cols, b_cols) in enumerate(shard_slices(model_config, layout, module)):
                cols = slice(shard * Wt, (shard + 1) * Wt)
                parts.append((dest[..., cols, :], b_cols) if is_b else (dest[..., cols], a_cols))
            tile = (functools.partial(_tile_layers_b, W=Wt, R=R) if is_b
                    else functools.partial(_tile_layers, W=Wt))
            region = regions[(module, is_b)] = _Region(is_b, parts, tile, set(), set())
        region.shapes.add(shape)
        width, rank = shape if is_b else shape[::-1]
        if rank != place.rb * R or any(len(range(width)[c]) != ch * Wt for _, c in region.parts):
            region.covered = False
        for items in groups:
            region.layers.update(layer for layer, _ in items)
    for region in regions.values():
        if len(region.layers) != L:
            region.covered = False
    return regions


def read_paged_adapter(plan: AdapterPlan, model_config: ModelConfig, layout: PoolLayout, max_rank: int,
                       dtype, out: Optional[np.ndarray] = None, threads: int = 1) -> tuple[PagedAdapter, int]:
    """Read the adapter's weights file into a PagedAdapter in ``dtype`` (numpy; B's pages transposed, as
    ``transposed`` says); returns it and the bytes read from the file. ``out``: a byte buffer to build the
    tiles in (an arena block, or a buffer reused by a caller that copies them elsewhere: new memory costs a
    page fault per 4 KiB). Raises AdapterError for a missing, truncated or corrupt file, weights that
    disagree with the config or the base model, and non-finite values.

    The tensors of one module (A or B) of equal rank in consecutive layers are read into one small buffer,
    checked and tiled with one strided copy each while the buffer is in the cache. Only the padding of a
    reused ``out`` is zeroed (fresh memory is zero already): with the file's dtype equal to ``dtype`` the
    bytes are read once by the kernel, and read once and written once by numpy, all outside the GIL.

    ``threads`` > 1 splits the batches (each a different part of the tiles) into that many runs of the file,
    read at once: one reader reaches ~2.2 GB/s on the H200 host, so a 51 MB adapter takes ~23 ms alone."""
    path = plan.weights_path
    dtype = np.dtype(dtype)
    R, W, L = layout.page_rows, layout.page_width, model_config.num_layers
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise AdapterError(f"{path} no longer exists (the adapter folder was moved or deleted after the "
                           "adapter was registered)") from e
    except OSError as e:
        raise AdapterError(f"cannot open {path}: {e}") from e
    with f:
        spans = read_safetensors_header(f, path, AdapterError)
        pairs = match_tensors(spans, plan.cfg, model_config, max_rank, path, plan.layer_ranks)
        batches: dict[tuple, list] = {}  # (module, is B, dtype tag, shape) -> [[(layer, tensor name)]]
        for p in pairs:
            for name, is_b in ((p.a, False), (p.b, True)):
                span = spans[name]
                if span.dtype not in SAFETENSORS_NUMPY:
                    raise AdapterError(f"tensor {name!r} in {path.name} has unsupported dtype {span.dtype} "
                                       f"(supported: {', '.join(sorted(SAFETENSORS_NUMPY))})")
                key = (p.module, is_b, span.dtype, span.shape)
                groups = batches.setdefault(key, [[]])
                if len(groups[-1]) * (span.end - span.start) >= _BATCH_BYTES:
                    groups.append([])  # a new batch of layers: the staging buffer stays small
                groups[-1].append((p.layer, name))
        shape = (L, plan.num_pages, R, W)
        size = math.prod(shape) * dtype.itemsize
        reused = out is not None and out.nbytes >= size
        tiles = out[:size].view(dtype).reshape(shape) if reused else _new_zeros(shape, dtype)
        regions = _regions(plan, batches, model_config, layout, tiles)
        if reused:  # padding is zero; what the tensors fill is written below
            for region in regions.values():
                region.zero_padding(L, R)
        same_bits = _UINT[dtype.itemsize]
        fd = f.fileno()
        flat = [(key, items) for key, groups in batches.items() for items in groups]

        def batch(key, items) -> int:
            module, is_b, tag, tshape = key
            region = regions[(module, is_b)]
            per = spans[items[0][1]].end - spans[items[0][1]].start
            stage = _staging_buffer(per * len(items))[:per * len(items)]
            view = memoryview(stage)
            for i, (_, name) in enumerate(items):
                pread_into(fd, view[i * per:(i + 1) * per], spans[name].start, path, AdapterError)
            if _finite_error(stage, tag):
                bad = next(name for i, (_, name) in enumerate(items)
                           if _finite_error(stage[i * per:(i + 1) * per], tag))
                raise AdapterError(f"tensor {bad!r} has non-finite values (NaN or Inf)")
            src = stage.view(SAFETENSORS_NUMPY[tag]).reshape((len(items),) + tshape)
            if src.dtype != dtype:
                # Into the pool's format here, float64 through float32 as the float32 loader rounds it. A
                # finite value past the narrower format's range (1e300 to float32, 1e5 to float16) becomes
                # Inf in the cast, so what the pool will hold is checked again.
                if src.dtype == np.float64:
                    src = src.astype(np.float32)
                src = src.astype(dtype)
                for i, (_, name) in enumerate(items):
                    if _finite_error(src[i].reshape(-1).view(np.uint8), _TAG[dtype]):
                        raise AdapterError(f"tensor {name!r} has values outside {dtype.name}'s range (the "
                                           f"engine's dtype): they would be Inf in the pool")
            lo, hi = items[0][0], items[-1][0]
            if hi - lo == len(items) - 1:  # consecutive layers (items go up by layer): a plain strided copy
                layers = slice(lo, hi + 1)
            else:
                layers = np.array([layer for layer, _ in items], np.intp)
            # Each device's columns of the matrix go to its columns of the pages (one device: all of both),
            # as bits: src is in the pool's format by now, and an integer copy releases the GIL, no cast loop.
            for part, cols in region.parts:
                part_src = src[:, cols] if is_b else src[..., cols]  # B is stored [d_out, r]
                region.tile(part.view(same_bits), layers, part_src.view(same_bits))
            return stage.nbytes

        # In file order of each batch's first tensor: the reads go mostly forward through the file.
        ordered = sorted(flat, key=lambda kv: spans[kv[1][0][1]].start)
        threads = max(1, min(int(threads), len(ordered)))

        def run_batches(run) -> int:
            return sum(batch(key, items) for key, items in run)

        if threads == 1:
            nbytes = run_batches(ordered)
        else:
            cut = [len(ordered) * i // threads for i in range(threads + 1)]
            runs = [ordered[cut[i]:cut[i + 1]] for i in range(threads)]
            futures = [_pool(threads).submit(run_batches, run) for run in runs[1:]]
            nbytes, error = 0, None
            try:
                nbytes = run_batches(runs[0])  # the first run on this thread
            except BaseException as e:  # Ctrl-C too: raised below, once no thread reads the file any more
                error = e
            for fut in futures:
                try:
                    nbytes += fut.result()
                except BaseException as e:
                    error = error or e
            if error is not None:
                raise error
    return PagedAdapter(tiles, plan.groups, plan.num_pages, plan.b_pages), nbytes


__all__ = ["AdapterPlan", "ModulePlace", "plan_adapter", "read_paged_adapter"]
