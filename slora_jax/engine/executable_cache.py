"""Step programs kept on disk as serialized executables, so that a restart neither traces nor lowers them.

JAX's persistent compilation cache is keyed by the lowered program: a restart must trace and lower every
step program before it can look one up. On the H200 a second start of the 8B engine loaded all 24 programs
from that cache and still took 16.9 s in ``precompile()``, 16.5 s of it tracing and lowering (they hold the
GIL, so they run one by one; benchmarks/NOTES.md). Here each compiled program is also stored whole
(``jax.experimental.serialize_executable``), keyed by what the engine knows before tracing: the program's own
statics (mode, kernel backend, sampling, LoRA groups, tensor parallelism) and input layout, the model's static
structure, every argument's shape, dtype and sharding, the devices, the JAX, jaxlib and flax versions and
every JAX option that can change a program, and hashes of the source the programs are built from and of its
modules' settings (upper-case module globals: kernel block sizes and defaults). What is not named there
cannot change a program without a code change, and a code change is a new version (its own folder; the
oldest versions are pruned). As a last guard, an entry that fails to load, or fails on its first run, is
deleted and the program compiled as before.

What is stored is always a program compiled here, never one JAX's persistent cache supplied: on the CPU
(jax 0.10.2) such a copy serializes without its machine code, and the copy read back fails at its first run
with "Function ... not found" (benchmarks/serialize_roundtrip.py shows it on a backend). ``compile`` keeps the
program out of that cache and out of JAX's in-memory one, which may hold a copy an earlier engine of the
process loaded from it.

Entries are executables for this machine's devices: they are only read back by a process of the same kind
(one process; the same device kind and ids). Loading one runs code from the cache folder, as JAX's own cache
does: the folder must be as trusted as the code.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import jax

from slora_jax.compile_cache import bypass_works, persistent_cache_hits, without_persistent_cache

log = logging.getLogger("slora_jax.compile_cache")

_PACKAGES = ("slora_jax", "pallas_kernels", "sharding")
# Parts of the package no step program is built from: their edits and imports leave the keys alone, so
# `serve`, `bench` and scripts share entries.
_OUTSIDE = ("slora_jax/server/", "slora_jax/bench/", "slora_jax/deploy/", "slora_jax/clients/", "slora_jax/cli.py",
            "slora_jax/training/")
_FORMAT = 3  # 3: entries compiled outside JAX's persistent cache
# JAX options that do not change a compiled program (where caches and logs go, what is printed).
_IGNORED_OPTIONS = ("cache", "log", "dump", "explain", "report", "debug_log", "traceback", "persistent")
# A compile option at its default value: a program compiled with it is a new entry of JAX's in-memory cache
# (keyed by the options), so ``compile`` gets a program compiled now, not a copy loaded earlier.
_FRESH_OPTIONS = {"xla_hlo_graph_addresses": False}
_refusal_lock = threading.Lock()
# Stored programs of this many other versions of the code are kept besides the current one's.
KEEP_OTHER_VERSIONS = 3


def _outside(name: str) -> bool:
    path = name.replace(".", "/")
    return any(path == o.rstrip("/").removesuffix(".py") or path.startswith(o) for o in _OUTSIDE)


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of every Python file of the packages the step programs are built from."""
    h = hashlib.sha256()
    for name in _PACKAGES:
        mod = sys.modules.get(name)
        if mod is None or not getattr(mod, "__file__", None):
            continue
        root = Path(mod.__file__).parent
        for path in sorted(root.rglob("*.py")):
            rel = f"{name}/{path.relative_to(root).as_posix()}"
            if not any(rel.startswith(o) for o in _OUTSIDE):
                h.update(rel.encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def settings_hash() -> str:
    """A hash of the loaded modules' settings (upper-case globals of plain types): a kernel default changed
    at run time (a benchmark's variant) makes other programs, which must not be read back as the old ones."""
    h = hashlib.sha256()
    for name in sorted(m for m in list(sys.modules) if m.split(".")[0] in _PACKAGES and not _outside(m)):
        mod = sys.modules.get(name)
        for key, value in sorted(vars(mod).items()) if mod is not None else ():
            if key.isupper() and isinstance(value, (bool, int, float, str, tuple, frozenset, type(None))):
                h.update(f"{name}.{key}={value!r};".encode())
    return h.hexdigest()


def _environment() -> str:
    devices = jax.devices()
    backend = devices[0].client
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    try:
        import flax

        flax_version = flax.__version__
    except (ImportError, AttributeError):
        flax_version = None
    # Every JAX option that can change a program (the PRNG's bits, precision, partitioner, promotion...),
    # not only those known to: JAX's own in-memory cache keys on its trace context for the same reason.
    options = sorted((k, repr(v)) for k, v in getattr(jax.config, "values", {}).items()
                     if not any(part in k for part in _IGNORED_OPTIONS))
    return repr((_FORMAT, jax.__version__, jaxlib_version, flax_version,
                 getattr(backend, "platform_version", None), jax.process_count(),
                 tuple((d.id, d.device_kind) for d in devices), os.environ.get("XLA_FLAGS", ""),
                 os.environ.get("LIBTPU_INIT_ARGS", ""), options))


def _aval(x) -> tuple:
    return (tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)),
            repr(getattr(x, "sharding", None)))


def _prune(root: Path, current: Path) -> None:
    """Drop all but the KEEP_OTHER_VERSIONS most recently used other versions' folders, and temporary files
    an interrupted store left behind (an hour old: a store under way takes seconds)."""
    others = sorted((p for p in root.iterdir() if p.is_dir() and p != current),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[KEEP_OTHER_VERSIONS:]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in current.glob("*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink()
        except OSError:
            pass


class ExecutableCache:
    """Serialized step executables in ``folder``, under keys that name everything the program depends on."""

    _option_refused = False  # set when XLA refused _FRESH_OPTIONS: nothing is stored in this process

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @staticmethod
    def open(compile_cache_dir: Optional[str]) -> Optional["ExecutableCache"]:
        """The cache beside JAX's (``<compile_cache_dir>/executables``), or None when off: no cache folder,
        or several processes (each would have to load the same programs in step)."""
        if compile_cache_dir is None or str(compile_cache_dir) == "" or jax.process_count() > 1:
            return None
        if not bypass_works():
            log.warning("JAX's compilation cache is not the one slora_jax set up; step programs are traced at "
                        "every start")
            return None
        root = Path(compile_cache_dir).expanduser().absolute() / "executables"
        # One folder per version of the code and environment: a new version's programs never mix with an old
        # one's, and the old ones are pruned here rather than kept for ever.
        version = hashlib.sha256((_environment() + source_hash()).encode()).hexdigest()[:20]
        folder = root / version
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.utime(folder)
            _prune(root, folder)
        except OSError as e:
            log.warning("cannot use %s (%s); step programs are traced at every start", folder, e)
            return None
        return ExecutableCache(folder)

    @staticmethod
    def context() -> str:
        """What every key of this moment shares (environment, source, settings): made once for a batch of
        keys, since settings_hash reads every loaded module."""
        return repr((_environment(), source_hash(), settings_hash()))

    def key(self, program_key, structure, args, context: Optional[str] = None) -> Optional[str]:
        """The entry name for one step program, or None where some part has no stable description (an
        object shown by address would differ at every start: such a program is not stored). ``context``:
        ``context()``, when the caller made it already."""
        parts = repr((context or self.context(), program_key, structure, [_aval(a) for a in jax.tree.leaves(args)]))
        if " at 0x" in parts:
            return None
        return hashlib.sha256(parts.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.exe"

    def drop(self, key: Optional[str]) -> None:
        """Delete an entry found not to fit its program (a caller saw it fail on its first run)."""
        if key is not None:
            self._path(key).unlink(missing_ok=True)

    def load(self, key: Optional[str]):
        """The executable stored under ``key``, or None (missing, or unreadable: then deleted)."""
        if key is None:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            from jax.experimental.serialize_executable import deserialize_and_load

            fmt, payload, in_tree, out_tree = pickle.loads(data)
            if fmt != _FORMAT:
                raise ValueError(f"format {fmt}")
            exe = deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign entry: compile instead
            log.warning("dropping unreadable step program %s (%s: %s); compiling it", path.name,
                        type(e).__name__, str(e)[:200])
            self.drop(key)
            return None
        return exe

    @classmethod
    def compile(cls, lowered):
        """(``lowered`` compiled now, outside JAX's caches, so that ``store`` keeps it whole; True), or (the
        program compiled as usual; False: not to be stored) where that cannot be made sure of: an XLA that
        refuses the option, a persistent cache that is not the wrapped one, or a load from it seen anyway."""
        if cls._option_refused or not bypass_works():
            return lowered.compile(), False
        hits = persistent_cache_hits()
        with without_persistent_cache():
            try:
                exe = lowered.compile(compiler_options=dict(_FRESH_OPTIONS))
            except Exception as e:  # noqa: BLE001 - only the refused option is handled here
                if "compile option" not in str(e).lower():
                    raise
                with _refusal_lock:  # precompile's threads may all meet it: one warning
                    first, cls._option_refused = not cls._option_refused, True
                if first:
                    log.warning("step programs are not stored (%s: %s)", type(e).__name__, str(e)[:200])
                return lowered.compile(), False
        return exe, persistent_cache_hits() == hits

    def store(self, key: Optional[str], compiled) -> None:
        """Keep ``compiled`` under ``key`` (written to a temporary file, then renamed: a reader never sees
        half an entry). Failures only cost the next start its speed-up."""
        if key is None:
            return
        try:
            from jax.experimental.serialize_executable import serialize

            payload, in_tree, out_tree = serialize(compiled)
            data = pickle.dumps((_FORMAT, payload, in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self._path(key))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except Exception as e:  # noqa: BLE001
            log.warning("could not store a step program in %s (%s: %s)", self.folder, type(e).__name__,
                        str(e)[:200])
