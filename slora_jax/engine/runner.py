"""ModelRunner: the device side of a step. Owns the weights, the pool buffer and the compiled programs.

A step is one jitted program over all layers (prefill or decode) that also samples; the pool is donated
to it so the KV writes happen in place. Input shapes are bucketed to powers of two so a long run
compiles a small, bounded set of programs (``compiled_shapes``), which ``precompile`` can build before
serving starts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.config import EngineConfig, ModelConfig
from slora_jax.engine.executable_cache import ExecutableCache
from slora_jax.errors import ConfigError
from slora_jax.engine.sampler import sample
from slora_jax.memory.pool import PoolLayout
from jax.sharding import PartitionSpec
from pallas_kernels import pool_storage
from sharding import MODEL_AXIS, TensorParallelLayout, fetch, logical_spec, named_sharding, put, shard_decoder
from flax import nnx

from slora_jax.model.llama import LORA_GROUPS, POOL_AXES, StepStatics, from_params, param_axes

ALL_GROUPS = tuple(LORA_GROUPS)

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


_log = logging.getLogger("slora_jax.engine")


def _wait(out) -> None:
    """Block until ``out`` is computed (a seam for the tests)."""
    jax.block_until_ready(out)


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def pack_inputs(inp: dict, samp: dict) -> tuple[np.ndarray, tuple]:
    """All of a step's host inputs (32-bit each) in one int32 buffer, so a step costs one host->device
    transfer; ``spec`` (static) says where each array lies."""
    parts, spec, off = [], [], 0
    for group, arrays in (("inp", inp), ("samp", samp)):
        for name in sorted(arrays):
            a = np.ascontiguousarray(arrays[name])
            assert a.dtype.itemsize == 4, (name, a.dtype)
            parts.append(a.reshape(-1).view(np.int32))
            spec.append((group, name, a.shape, a.dtype.str, off))
            off += a.size
    return np.concatenate(parts), tuple(spec)


def pack_tables(arrays: dict) -> tuple[np.ndarray, tuple]:
    """The adapter index tables ({group: (a_pages, b_pages, ranks, scales)}) in one int32 buffer: a change
    of any slot costs one host->device transfer, not one per array (16 per change were ~5 ms a step on
    the GPU while adapters streamed in)."""
    return pack_inputs({f"{g}/{i}": a for g, arrs in arrays.items() for i, a in enumerate(arrs)}, {})


def unpack_tables(buf: jax.Array, spec: tuple) -> dict:
    flat, _ = unpack_inputs(buf, spec)
    out: dict = {}
    for key in sorted(flat, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
        out.setdefault(key.split("/")[0], []).append(flat[key])
    return {g: tuple(v) for g, v in out.items()}


def unpack_inputs(buf: jax.Array, spec: tuple) -> tuple[dict, dict]:
    out: dict = {"inp": {}, "samp": {}}
    for group, name, shape, dtype, off in spec:
        x = buf[off:off + int(np.prod(shape, dtype=np.int64))]
        if np.dtype(dtype) != np.int32:
            x = jax.lax.bitcast_convert_type(x, jnp.dtype(dtype))
        out[group][name] = x.reshape(shape)
    return out["inp"], out["samp"]


def small_leaves(leaves, specs: Optional[tuple]) -> tuple:
    """Which weights travel packed: the vectors (norm weights) that every device holds whole, grouped by
    dtype: ((dtype, (leaf index, ...)), ...). A vector split over the devices (a q|k|v bias) stays apart."""
    groups: dict = {}
    for i, leaf in enumerate(leaves):
        if leaf.ndim == 1 and (specs is None or all(a is None for a in specs[i])):
            groups.setdefault(jnp.dtype(leaf.dtype).name, []).append(i)
    return tuple((dtype, tuple(idx)) for dtype, idx in sorted(groups.items()) if len(idx) > 1)


class ModelStructure:
    """The static half of the split model: its nnx graphdef and the treedef of its state's leaves. The step
    programs take the weights as a flat list of arrays (jit flattens a list in C++; an nnx State of an
    unrolled 32-layer model cost ~0.4 ms a call to flatten) and this as a static argument, hashed once
    (hashing the graphdef itself cost ~1 ms a call). With tensor parallelism it also holds the mesh and
    each weight's PartitionSpec, which the decoder's shard_map takes.

    ``packed`` (``small_leaves``): the norm vectors are passed as one concatenated array per dtype, the
    other weights one array each. Launching a program costs host time per argument and device (on a CPU
    ~0.4 us an argument at one device, ~0.7 us at two; more on a GPU); the 2 norms a layer are a third of
    an unrolled model's arguments. Slicing them back inside the program copies a few kB."""

    def __init__(self, graphdef, treedef, mesh=None, specs: Optional[tuple] = None, packed: tuple = (),
                 shapes: tuple = ()):
        self.graphdef, self.treedef = graphdef, treedef
        self.mesh, self.specs = mesh, specs
        self.packed, self.shapes = packed, shapes
        in_pack = {i for _, idx in packed for i in idx}
        self.apart = tuple(i for i in range(len(shapes)) if i not in in_pack)
        self._key = (graphdef, treedef, mesh, specs, packed, shapes)
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:  # stable across processes: the step executables' cache keys include it
        # A mesh's repr leaves out which devices it spans; their ids are part of what a program runs on.
        ids = None if self.mesh is None else tuple(int(d.id) for d in self.mesh.devices.flat)
        return f"ModelStructure{(self._key, ids)!r}"

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, ModelStructure) and self._hash == other._hash
                                 and self._key == other._key)

    def pack(self, leaves) -> list:
        """The arguments the step programs take for the model's ``leaves``: those kept apart, then one
        concatenated array per group of ``packed`` (placed like its members)."""
        out = [leaves[i] for i in self.apart]
        for _, idx in self.packed:
            out.append(_concat_vectors(leaves[idx[0]].sharding)([leaves[i] for i in idx]))
        return out

    def unpack(self, weights) -> list:
        """The model's leaves back from ``pack``'s arguments (inside a program: the packed ones are sliced)."""
        leaves = [None] * len(self.shapes)
        for i, w in zip(self.apart, weights):
            leaves[i] = w
        for (_, idx), buf in zip(self.packed, weights[len(self.apart):]):
            off = 0
            for i in idx:
                n = int(np.prod(self.shapes[i], dtype=np.int64))
                leaves[i] = buf[off:off + n].reshape(self.shapes[i])
                off += n
        return leaves

    def arg_specs(self) -> list:
        """PartitionSpecs of ``pack``'s arguments (with tensor parallelism)."""
        return [self.specs[i] for i in self.apart] + [PartitionSpec(None)] * len(self.packed)

    def merge(self, weights):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, self.unpack(weights)))

    def decoder(self, weights, pool, tables, inp, st: StepStatics):
        """The model's layers over the step's tokens: (final hidden states, pool). With tensor parallelism
        they run under shard_map, each device on its own heads, MLP columns and pool columns."""
        if self.mesh is None:
            return self.merge(weights)(pool, tables, inp, st)
        pool_spec = PartitionSpec(*POOL_AXES[:-1], MODEL_AXIS)

        def local(weights, pool, tables, inp):
            return self.merge(weights)(pool, tables, inp, st)

        run = shard_decoder(local, self.mesh, in_specs=(self.arg_specs(), pool_spec, PartitionSpec(), PartitionSpec()),
                            out_specs=(PartitionSpec(), pool_spec))
        return run(weights, pool, tables, inp)


def _prefill_impl(structure, weights, pool, tables_buf, buf, specs, *, st):
    spec, tables_spec = specs
    inp, samp = unpack_inputs(buf, spec)
    tables = unpack_tables(tables_buf, tables_spec)
    h, pool = structure.decoder(weights, pool, tables, inp, st)
    model = structure.merge(weights)
    if st.all_logits:
        return pool, model.logits(h)
    logits = model.logits(h[inp["last_index"]])
    tokens, logp = sample(logits, **samp, greedy_only=st.greedy_only)
    return pool, (tokens, logp)


def _generate_impl(structure, weights, pool, tables_buf, buf, specs, prev_tokens, *, st):
    """A decode or mixed step: the forward over the step's tokens, then one sample per row."""
    spec, tables_spec = specs
    inp, samp = unpack_inputs(buf, spec)
    tables = unpack_tables(tables_buf, tables_spec)
    # A token still on the device (a row of the previous step's output, not yet seen by the host) is named
    # by its row there; this lets the host queue step n+1 before it has read step n.
    prev = inp.pop("prev_rows")
    inp["tokens"] = jnp.where(prev >= 0, prev_tokens[jnp.maximum(prev, 0)], inp["tokens"])
    h, pool = structure.decoder(weights, pool, tables, inp, st)
    model = structure.merge(weights)
    last = inp.pop("last_index", None)
    tokens, logp = sample(model.logits(h if last is None else h[last]), **samp, greedy_only=st.greedy_only)
    # Fixed-size token output, so the next step's program takes it whatever this step's bucket.
    return pool, (jnp.zeros(prev_tokens.shape, jnp.int32).at[:tokens.shape[0]].set(tokens), logp)


@functools.lru_cache(maxsize=None)
def _concat_vectors(where):
    """Vectors placed by ``where`` (one device, or every device of a mesh) as one vector placed so."""
    return jax.jit(jnp.concatenate, out_shardings=where)


_PROGRAMS: dict = {}

# No rematerialization pass: it counted the donated pool, which the output aliases, against the device's
# memory and gave up ("Can't reduce memory use below 88 GiB ... only reduced to 184 GiB") on every 8B step
# program, while XLA's own memory analysis of the same programs shows 0-0.2 GiB of temporaries with and
# without it; without it they compile 1.4-1.7x faster (H200, benchmarks/results/step_memory-2026-11-30.json).
_STEP_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "rematerialization"}


def _step_program(st: StepStatics):
    """The jitted step for these statics over (structure, weights, ...), shared by every engine in the
    process: the model's structure (ModelStructure) is a static argument, so two engines of one model
    compile each shape once. The pool is donated: its updates happen in place."""
    if st not in _PROGRAMS:
        impl = _prefill_impl if st.mode == "prefill" else _generate_impl
        _PROGRAMS[st] = jax.jit(functools.partial(impl, st=st), static_argnums=(0, 5), donate_argnums=(2,),
                                compiler_options=_STEP_COMPILER_OPTIONS)
    return _PROGRAMS[st]


def _write_pages_impl(pool, pages, tiles):
    # In the pool's storage dtype: a bf16 scatter on a CPU would convert the whole pool (pool_storage).
    return pool.at[:, pages].set(pool_storage.to_storage(tiles, pool))


_write_pages = jax.jit(_write_pages_impl, donate_argnums=(0,))


@functools.lru_cache(maxsize=None)
def _take_columns(where):
    """x[..., cols] placed by ``where``; one program per placement and shape (the 32 layers of an unrolled
    model share theirs), the columns an argument."""
    return jax.jit(lambda x, cols: jnp.take(x, cols, axis=-1), out_shardings=where)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, econf: EngineConfig, params: dict, backend: str, device=None,
                 mesh=None):
        self.cfg, self.econf = cfg, econf
        self.dtype = DTYPES[econf.dtype]
        self.backend = backend
        self.device = device or jax.devices()[0]
        self.mesh = mesh
        # Where small per-step arrays (index tables, adapter tiles) live: one device, or every device.
        self.replicated = (jax.sharding.SingleDeviceSharding(self.device) if mesh is None
                           else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        scan = econf.resolved_scan_layers(jax.default_backend())
        self.tp = 1 if mesh is None else int(mesh.shape[MODEL_AXIS])
        # Compiled step programs kept whole, so a restart skips tracing and lowering. Not for programs over
        # several CPU devices: storing those is untried, and on the CPU they compile in about a second.
        self._exe_cache = (None if mesh is not None and jax.default_backend() == "cpu"
                           else ExecutableCache.open(econf.compile_cache_dir))
        self.tp_layout = TensorParallelLayout(cfg, self.tp)

        def place(a, axes):
            if mesh is None:
                return jax.device_put(jnp.asarray(a, dtype=self.dtype), self.device)
            return self._to_shard_major(jnp.asarray(a, dtype=self.dtype), axes)

        # The model's structure (static in the step programs) apart from its weights (arguments). Checkpoints
        # arrive fused and placed (model.device_load): placing them again moves nothing.
        self.graphdef, self.state = nnx.split(from_params(params, cfg, scan_layers=scan, place=place))
        self._split_weights()
        self.pool = None
        self._tables_dev = None
        self._tables_version = -1
        self.compiled_shapes: set = set()
        self._executables: dict = {}  # programs compiled ahead of use, by (mode, all_logits, greedy, spec)
        self._unproven: dict = {}  # those loaded from the executable cache and not yet run -> their entry key
        self.device_wait_s = 0.0
        # Host time spent queuing step programs (compilation on demand included), in parts: packing the
        # step's inputs, uploading changed index tables, launching the program.
        self.dispatch_parts = dict.fromkeys(("pack", "tables", "launch"), 0.0)
        self._tables_upload_s = 0.0

    @property
    def model(self):
        """The base model (an nnx Module over the runner's weights)."""
        return nnx.merge(self.graphdef, self.state)

    @property
    def params(self) -> dict:
        """The weights as the fused pytree (``Llama.params``): the runner's own arrays on one device; with
        tensor parallelism, the fused weights back in the model's column order (copies)."""
        if self.mesh is None:
            return self.model.params()
        graphdef, state = nnx.split(self.model)
        state = jax.tree.map(lambda v: v.replace(self._to_shard_major(v[...], param_axes(v), inverse=True)), state,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
        return nnx.merge(graphdef, state).params()

    @params.setter
    def params(self, params: dict) -> None:
        if self.mesh is not None:
            scan = isinstance(params["layers"], dict)
            model = from_params(params, self.cfg, scan_layers=scan, place=self._to_shard_major)
            self.graphdef, self.state = nnx.split(model)
            self._split_weights()
            return
        model = self.model
        model.set_params(params)
        self.state = nnx.state(model)
        self._split_weights()

    # Fused weights whose columns hold several projections' outputs, by their last logical axis.
    _FUSED = {"heads": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}

    def _to_shard_major(self, a, axes: tuple, inverse: bool = False):
        """A weight placed on the mesh: fused q|k|v (and its bias) and gate|up columns reordered shard-major
        (``sharding.tensor_parallel``), so that a contiguous split hands each device its own q, k, v; then
        split by the partition rules. ``inverse``: back to the model's order, replicated."""
        modules = self._FUSED.get(axes[-1])  # wo and w_down split their rows, already in head order
        if modules is None:
            cols = None
        elif inverse:
            cols = self.tp_layout.unfused_columns(modules)
        else:
            cols = self.tp_layout.fused_columns(modules)
        shape = a.shape if cols is None else a.shape[:-1] + (len(cols),)
        where = (jax.sharding.NamedSharding(self.mesh, PartitionSpec()) if inverse
                 else named_sharding(self.mesh, axes, shape))
        if cols is None:
            return put(a, where)
        return _take_columns(where)(a, np.asarray(cols))

    def _split_weights(self) -> None:
        leaves, treedef = jax.tree.flatten(self.state)
        specs = None
        if self.mesh is not None:
            variables = jax.tree.leaves(self.state, is_leaf=lambda x: isinstance(x, nnx.Variable))
            specs = tuple(logical_spec(param_axes(v), v.shape, self.mesh) for v in variables)
            assert len(specs) == len(leaves)
        self._structure = ModelStructure(self.graphdef, treedef, self.mesh, specs, small_leaves(leaves, specs),
                                         tuple(tuple(leaf.shape) for leaf in leaves))
        # The step programs' weight arguments (ModelStructure.pack); the packed norm vectors are copies of a
        # few kB each, made again whenever the weights change.
        self._weights = self._structure.pack(leaves)

    def allocate_pool(self, layout: PoolLayout) -> None:
        """Allocate the unified pool once (directly in its final placement); every later update is in place."""
        self.layout = layout
        # Decode steps read their input tokens from here when the host supplies them itself.
        self._no_prev_tokens = put(np.zeros(bucket(self.econf.max_batch_size, 2), np.int32), self.replicated)
        where = (jax.sharding.SingleDeviceSharding(self.device) if self.mesh is None
                 else named_sharding(self.mesh, POOL_AXES, layout.shape))
        # A bfloat16 pool on a CPU holds its bits as uint16 (pallas_kernels.pool_storage); the ops read either.
        storage = pool_storage.storage_dtype(self.dtype)
        self.pool = jax.jit(lambda: jnp.zeros(layout.shape, storage), out_shardings=where)()

    # ------------------------------------------------------------------ programs
    def _statics(self, mode: str, all_logits: bool = False, greedy_only: bool = False,
                 lora_groups: tuple = ALL_GROUPS) -> StepStatics:
        return StepStatics(mode=mode, backend=None if self.backend == "auto" else self.backend,
                           all_logits=all_logits, greedy_only=greedy_only, lora_groups=tuple(lora_groups), tp=self.tp)

    def _fn(self, mode: str, all_logits: bool = False, greedy_only: bool = False, lora_groups: tuple = ALL_GROUPS):
        return _step_program(self._statics(mode, all_logits, greedy_only, lora_groups))

    def _tables(self, tables) -> tuple:
        """(device buffer, static spec) of the index tables, uploaded again only when a slot changed."""
        if tables.version != self._tables_version:
            t0 = time.perf_counter()
            buf, spec = pack_tables(tables.arrays)
            self._tables_dev = (put(buf, self.replicated), spec)
            self._tables_version = tables.version
            self._tables_upload_s += time.perf_counter() - t0
        return self._tables_dev

    def _args(self, mode, tables, inp, samp, prev_tokens):
        buf, spec = pack_inputs(inp, samp)
        tables_buf, tables_spec = self._tables(tables)
        spec = (spec, tables_spec)
        args = [self._structure, self._weights, self.pool, tables_buf, buf, spec]
        if mode != "prefill":
            args.append(self._no_prev_tokens if prev_tokens is None else prev_tokens)
        return args, spec

    def lower(self, mode: str, tables, inp: dict, samp: dict, all_logits: bool = False,
              lora_groups: tuple = ALL_GROUPS):
        """The step program for these inputs, lowered (for inspecting what it compiles to)."""
        args, _ = self._args(mode, tables, inp, samp, None)
        return self._fn(mode, all_logits, not bool(np.any(samp["temperature"] > 0)), lora_groups).lower(*args)

    def dispatch(self, mode: str, tables, inp: dict, samp: dict, all_logits: bool = False, prev_tokens=None,
                 lora_groups: tuple = ALL_GROUPS):
        """Queue one step on the device and return its (device) outputs without waiting for them.

        decode and mixed: ``inp["prev_rows"]`` [T] picks each token from ``prev_tokens`` (the previous step's
        device output) where >= 0. ``lora_groups``: the LoRA groups the program runs kernels for."""
        t0 = time.perf_counter()
        upload0 = self._tables_upload_s
        greedy_only = not bool(np.any(samp["temperature"] > 0))
        args, spec = self._args(mode, tables, inp, samp, prev_tokens)
        key = (mode, all_logits, greedy_only, tuple(lora_groups), spec)
        exe = self._executables.get(key)
        t1 = time.perf_counter()
        with self._out_of_memory_explained(mode):
            if exe is not None and key in self._unproven:
                self.pool, out = self._first_run(key, exe, args, mode, all_logits, greedy_only, lora_groups)
            elif exe is not None:
                # Compiled ahead (``precompile``): the structure and spec are baked in.
                self.pool, out = exe(*args[1:5], *args[6:])
            else:
                self.compiled_shapes.add(key)
                self.pool, out = self._fn(mode, all_logits, greedy_only, lora_groups)(*args)
        t2 = time.perf_counter()
        upload = self._tables_upload_s - upload0
        self.dispatch_parts["tables"] += upload
        self.dispatch_parts["pack"] += (t1 - t0) - upload
        self.dispatch_parts["launch"] += t2 - t1
        return out

    def precompile(self, tables, steps, max_workers: Optional[int] = None, on_compiled=None) -> list[dict]:
        """Compile the programs of ``steps`` [(mode, inp, samp, lora_groups, info)] ahead of use. Tracing and lowering
        hold the GIL, so they run here one by one; XLA's compilation does not, so each lowered program is
        handed to a pool of threads as soon as it exists. Returns ``info`` + seconds per program."""
        workers = max_workers or min(8, os.cpu_count() or 1)
        records = []
        cache = self._exe_cache

        def load_one(ekey, info):
            t0 = time.perf_counter()
            exe = cache.load(ekey)
            return exe, dict(info, lower_s=0.0, compile_s=time.perf_counter() - t0, source="executable cache")

        def compile_one(key, ekey, lowered, info, lower_s):
            t0 = time.perf_counter()
            if cache is None or ekey is None:  # nothing to store: JAX's cache may supply it
                exe, storable = lowered.compile(), False
            else:
                exe, storable = cache.compile(lowered)
            rec = dict(info, lower_s=lower_s, compile_s=time.perf_counter() - t0, source="compiled")
            if storable:
                cache.store(ekey, exe)
            return key, exe, rec

        context = None if cache is None else cache.context()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            todo = []
            for mode, inp, samp, groups, info in steps:
                greedy_only = not bool(np.any(samp["temperature"] > 0))
                args, spec = self._args(mode, tables, inp, samp, None)
                key = (mode, False, greedy_only, tuple(groups), spec)
                if key in self.compiled_shapes:  # compiled ahead or on demand already
                    continue
                st = self._statics(mode, False, greedy_only, groups)  # the backend and TP size too
                dynamic = args[1:5] + args[6:]
                ekey = None if cache is None else cache.key((st, spec), self._structure, dynamic, context)
                todo.append((key, ekey, mode, greedy_only, groups, args, info))
            # Programs stored whole by an earlier start load in parallel, with nothing traced.
            loads = [pool.submit(load_one, t[1], t[-1]) if t[1] is not None else None for t in todo]
            futures = []
            for (key, ekey, mode, greedy_only, groups, args, info), load in zip(todo, loads):
                exe, rec = load.result() if load is not None else (None, None)
                if exe is not None:
                    self._executables[key] = exe
                    self._unproven[key] = ekey  # until its first run shows it fits
                    self.compiled_shapes.add(key)
                    records.append(rec)
                    if on_compiled is not None:
                        on_compiled(rec)
                    continue
                t0 = time.perf_counter()
                lowered = self._fn(mode, False, greedy_only, groups).lower(*args)
                futures.append(pool.submit(compile_one, key, ekey, lowered, info, time.perf_counter() - t0))
            for fut in concurrent.futures.as_completed(futures):
                key, exe, rec = fut.result()
                self._executables[key] = exe
                self.compiled_shapes.add(key)
                records.append(rec)
                if on_compiled is not None:
                    on_compiled(rec)
        return records

    def _first_run(self, key, exe, args, mode, all_logits, greedy_only, lora_groups):
        """The first run of a program loaded from the executable cache. Arguments it does not take (an entry
        that does not fit its program after all) are refused before anything runs: the entry is deleted
        and the program compiled here instead. A run that fails on the device (an entry stored without its
        machine code failed so, as "Function ... not found") is waited for here, once per program: its
        entry is deleted before the error goes on, so the next start compiles the program."""
        ekey = self._unproven.pop(key)
        try:
            out = exe(*args[1:5], *args[6:])
        except (TypeError, ValueError) as e:
            _log.warning("a stored step program did not take its arguments (%s: %s); compiling it",
                         type(e).__name__, str(e)[:200])
            self._exe_cache.drop(ekey)
            del self._executables[key]
            return self._fn(mode, all_logits, greedy_only, lora_groups)(*args)
        try:
            _wait(out)
        except Exception:
            _log.error("a stored step program failed at its first run; its entry is deleted")
            self._exe_cache.drop(ekey)
            raise
        return out

    @property
    def dispatch_s(self) -> float:
        return sum(self.dispatch_parts.values())

    @contextlib.contextmanager
    def _out_of_memory_explained(self, mode: str):
        """A step that runs out of device memory raises an error saying which settings to lower; other errors
        pass as they are. The pool is sized from the memory free before any step ran, so what a step program
        needs on top of it (activations of max_prefill_tokens tokens, logits) is what no longer fits."""
        try:
            yield
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            pool_gb = int(np.prod(self.layout.shape)) * jnp.dtype(self.dtype).itemsize / 1e9
            first = str(e).strip().splitlines()[0][:300]
            econf = self.econf
            raise ConfigError(
                f"the {mode} step ran out of device memory ({first}). The page pool holds {self.layout.num_pages} "
                f"pages ({pool_gb:.1f} GB); leave the step programs more room: lower EngineConfig.memory_fraction "
                f"(now {econf.memory_fraction}) or num_pages, or max_prefill_tokens (now {econf.max_prefill_tokens}); "
                f"`slora-jax serve` and `bench` take them as --memory-fraction, --num-pages, --max-prefill-tokens"
            ) from e

    def collect(self, out):
        """Wait for a dispatched step and return its outputs as numpy."""
        t0 = time.perf_counter()
        with self._out_of_memory_explained("queued"):  # an asynchronous failure of the step surfaces here
            out = jax.tree.map(fetch, out)  # with several processes, each reads its own copy
        self.device_wait_s += time.perf_counter() - t0
        return out

    def run(self, mode: str, tables, inp: dict, samp: dict, all_logits: bool = False):
        """Run one step; returns host numpy results ((tokens, logprobs) or logits)."""
        return self.collect(self.dispatch(mode, tables, inp, samp, all_logits))

    def write_pages(self, pages: np.ndarray, tiles) -> None:
        """Copy page tiles [L, n, R, W] into pool pages (in place; asynchronous on the device)."""
        n = len(pages)
        if n == 0:
            return
        nb = bucket(n)
        if nb != n:  # pad to a bucket so loads of any size reuse a few compiled copies
            pages = np.concatenate([pages, np.zeros(nb - n, np.int32)])  # page 0 is reserved scratch
            tiles = jnp.concatenate([jnp.asarray(tiles), jnp.zeros(
                (tiles.shape[0], nb - n) + tuple(tiles.shape[2:]), tiles.dtype)], axis=1)
        self.pool = _write_pages(self.pool, put(np.asarray(pages, np.int32), self.replicated),
                                 put(tiles, self.replicated))

    def release(self) -> None:
        """Drop every device buffer this runner holds (weights, pool, tables, compiled programs)."""
        self.pool = None
        self.state, self._weights = None, []
        self._tables_dev, self._tables_version = None, -1
        self._no_prev_tokens = None
        self._executables.clear()
        self.compiled_shapes.clear()

    def pool_pointer(self) -> int:
        """Device address of the pool buffer (unchanged across steps when updates are in place)."""
        return self.pool.unsafe_buffer_pointer()
