"""JAX's persistent compilation cache, on by default, so that a restart with the same configuration loads
its step programs instead of compiling them (a 7B/8B step program takes tens of seconds on the GPU).

``enable_compilation_cache`` points JAX at a folder (``~/.cache/slora-jax/xla`` by default) and caches
every program whatever its compile time (JAX's default skips those under a second, which would leave a
restart compiling the many small ones). On the GPU, JAX also keeps XLA's autotuning results there.

A damaged entry never stops a start. JAX itself only warns about an entry it cannot load and compiles
the program again, but then keeps the damaged file (it never overwrites an existing key), so every later
start would compile that program again. The cache is therefore wrapped so that an entry that does not
decompress is deleted on sight, and a program compiled again after its entry failed to load replaces
that entry.

The setting is process-wide (JAX has one cache per process): the first engine's folder is used by every
engine and every jitted function of the process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger("slora_jax.compile_cache")

DEFAULT_CACHE_DIR = "~/.cache/slora-jax/xla"
_lock = threading.Lock()
_thread = threading.local()  # without_persistent_cache's switch, per thread


def disable_compilation_cache() -> None:
    """Turn the persistent cache off for this process (until ``enable_compilation_cache``): for measuring
    compilation itself."""
    import jax

    with _lock:
        jax.config.update("jax_compilation_cache_dir", None)
        try:
            from jax._src import compilation_cache as cc

            cc.reset_cache()
        except Exception as e:  # noqa: BLE001 - a JAX whose internals differ
            log.debug("could not reset JAX's compilation cache (%s: %s)", type(e).__name__, e)


def enable_compilation_cache(cache_dir: Optional[Union[str, Path]] = DEFAULT_CACHE_DIR,
                             min_compile_time_s: float = 0.0) -> Optional[Path]:
    """Turn JAX's persistent compilation cache on in ``cache_dir`` (created if missing) for this process.

    ``cache_dir`` None (or "") leaves JAX's own setting as it is: off unless the caller configured it.
    ``min_compile_time_s``: programs that compile faster are not written (0: every program).
    Returns the folder in use, or None when caching is off or the folder cannot be created (logged:
    a read-only home only costs the speed-up)."""
    if cache_dir is None or str(cache_dir) == "":
        return None
    import jax

    path = Path(cache_dir).expanduser().absolute()
    if jax.process_count() > 1:
        # A program's cache key names its devices by id but not how many processes hold them: a job of two
        # one-device processes and one process with two devices compile to the same keys, and loading the
        # other kind's executable can crash the process. Jobs keep their own folder per process count.
        path = path / f"job-of-{jax.process_count()}-processes"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("cannot create the compilation cache folder %s (%s); compiling without a cache", path, e)
        return None
    with _lock:
        changed = jax.config.jax_compilation_cache_dir != str(path)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
        jax.config.update("jax_enable_compilation_cache", True)
        _install_self_healing(changed)
    return path


def _install_self_healing(reset: bool) -> None:
    """Wrap JAX's file cache in ``_SelfHealingCache``. This reaches into jax._src (no public hook exists);
    with another JAX layout it logs and leaves JAX's cache as it is, which still warns and recompiles."""
    try:
        from jax._src import compilation_cache as cc
    except ImportError:  # pragma: no cover - a JAX without this module
        log.debug("jax._src.compilation_cache not found: damaged cache entries are only skipped")
        return
    try:
        if reset and getattr(cc, "_cache_initialized", False):
            cc.reset_cache()  # initialised earlier with another folder
        if getattr(cc, "_cache", None) is None:
            cc._initialize_cache()
        base = cc._cache
        if base is not None and not isinstance(base, _SelfHealingCache):
            cc._cache = _SelfHealingCache(base, cc)
    except Exception as e:  # noqa: BLE001 - a JAX whose internals differ: keep its own behaviour
        log.debug("could not wrap JAX's compilation cache (%s: %s)", type(e).__name__, e)


class _SelfHealingCache:
    """JAX's cache interface (get/put) over its file cache: damaged entries are dropped and rebuilt."""

    def __init__(self, base, cc):
        self._base, self._cc = base, cc
        self.hits = self.misses = self.dropped = 0

    def __getattr__(self, name):  # the rest of the interface (path, clear, ...) is the base cache's
        return getattr(self._base, name)

    def _file(self, key: str) -> Optional[Path]:
        try:
            from jax._src.lru_cache import _CACHE_SUFFIX
        except ImportError:  # pragma: no cover
            _CACHE_SUFFIX = "-cache"
        root = getattr(self._base, "path", None) or getattr(self._base, "_path", None)
        return None if root is None else Path(str(root)) / f"{key}{_CACHE_SUFFIX}"

    def _drop(self, key: str) -> None:
        f = self._file(key)
        if f is not None:
            try:
                f.unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot remove damaged compilation cache entry %s: %s", f, e)

    def get(self, key: str):
        if bypassed():
            return None
        value = self._base.get(key)
        if value is None:
            self.misses += 1
            return None
        try:
            # The same checks JAX makes before deserializing: a truncated or overwritten file fails here.
            self._cc.extract_executable_and_time(self._cc.decompress_executable(value))
        except Exception as e:  # noqa: BLE001 - zstd/zlib raise their own error types
            log.warning("compilation cache entry %s is damaged (%s: %s); removed, compiling again",
                        key, type(e).__name__, e)
            self.dropped += 1
            self._drop(key)
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: bytes) -> None:
        if bypassed():
            return
        # JAX writes only after compiling, i.e. after ``get`` found nothing usable: an entry still there
        # failed to load (JAX warned), so it is replaced rather than kept, as the file cache would.
        f = self._file(key)
        if f is None or getattr(self._base, "eviction_enabled", True):
            self._drop(key)
            self._base.put(key, value)  # the base cache does its own size accounting
            return
        # Written under another name and renamed: another process starting meanwhile (the folder is shared)
        # never reads half a file.
        tmp = f.with_name(f"{f.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(value)
            os.replace(tmp, f)
        except OSError as e:
            log.warning("cannot write compilation cache entry %s: %s", f, e)
            tmp.unlink(missing_ok=True)


__all__ = ["DEFAULT_CACHE_DIR", "disable_compilation_cache", "enable_compilation_cache"]


def bypassed() -> bool:
    """Whether this thread is inside ``without_persistent_cache``."""
    return getattr(_thread, "bypass", False)


def bypass_works() -> bool:
    """Whether ``without_persistent_cache`` keeps a program out of the persistent cache: JAX's cache is the
    one wrapped here (enable_compilation_cache), or none is set up and no folder is set."""
    try:
        from jax._src import compilation_cache as cc
    except ImportError:  # pragma: no cover - a JAX without this module
        return False
    import jax

    cache = getattr(cc, "_cache", None)
    if cache is not None:
        return isinstance(cache, _SelfHealingCache)
    return not jax.config.jax_compilation_cache_dir


_listening = False


def persistent_cache_hits() -> int:
    """Programs this thread has loaded from JAX's persistent cache so far (JAX's own monitoring event, which
    it records on the compiling thread), counted from the first call."""
    global _listening
    with _lock:
        if not _listening:
            import jax

            def on_event(event, *args, **kwargs):
                if event == "/jax/compilation_cache/cache_hits":
                    _thread.hits = getattr(_thread, "hits", 0) + 1

            jax.monitoring.register_event_listener(on_event)
            _listening = True
    return getattr(_thread, "hits", 0)


@contextlib.contextmanager
def without_persistent_cache():
    """A context in which programs are neither read from nor written to the persistent cache (this thread
    only). JAX's own switch for this (``jax_enable_compilation_cache`` as a context) is read once per
    process, at its first compilation, so here the wrapped cache answers "missing" and drops writes instead
    (a cache not wrapped here is not kept out: ``bypass_works`` says which). The executable cache compiles
    the programs it stores so: a program loaded from JAX's cache does not serialize whole
    (engine/executable_cache.py)."""
    before = bypassed()
    _thread.bypass = True
    try:
        yield
    finally:
        _thread.bypass = before
