"""Adapters as the server sees them: names a request may use, runtime loads and unloads, draining unloads and
the state file that makes runtime changes survive a restart.

Reading and validating an adapter folder can take long (a large file, a slow disk) and runs on a worker
thread of its own: never on the engine thread, whose steps would wait, nor on the event loop, whose other
connections would. Paths that reach a client are shown relative to the adapter root.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from slora_jax.errors import AdapterError, ModelError, UnknownAdapterError
from slora_jax.server.engine_loop import EngineLoop
from slora_jax.server.errors import APIError, bad_request, model_not_found
from slora_jax.server.paths import resolve_adapter_path

log = logging.getLogger("slora_jax.server")

# Names go into URLs, JSON, log lines and Prometheus labels: ASCII letters, digits and ._- only, starting with a
# letter or digit (no NUL, newline, quote, slash or bidirectional control), and short.
MAX_NAME_CHARS = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# How long an unload with drain waits for the adapter's requests by default, and at most.
DEFAULT_DRAIN_TIMEOUT_S = 60.0
MAX_DRAIN_TIMEOUT_S = 3600.0


def check_adapter_name(name) -> str:
    """``name`` if usable as an adapter name; APIError 400 saying what is allowed otherwise."""
    if not isinstance(name, str) or not name:
        raise bad_request("lora_name must be a non-empty string", "lora_name")
    if len(name) > MAX_NAME_CHARS or _NAME.fullmatch(name) is None:
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise bad_request(f"adapter name {shown!r} is not allowed: use at most {MAX_NAME_CHARS} ASCII letters, "
                          "digits, '.', '_' or '-', starting with a letter or digit", "lora_name")
    return name


def shown_path(path, root: Optional[Path]) -> str:
    """A server path as clients see it: relative to the adapter root when inside it, else its folder name."""
    p = Path(str(path))
    if root is not None:
        try:
            rel = p.resolve().relative_to(root)
            return rel.as_posix() or "."
        except (ValueError, OSError, RuntimeError):
            pass
    return p.name


def redact_paths(message: str, root: Optional[Path], hidden: tuple = ()) -> str:
    """``message`` with absolute paths under the adapter root made relative, and each of ``hidden``
    (server folders such as the model's) replaced by its last part."""
    if root is not None:
        message = message.replace(str(root) + os.sep, "").replace(str(root), ".")
    for h in hidden:
        if h:
            message = message.replace(str(h), Path(str(h)).name)
    return message


class StateFile:
    """The runtime-loaded adapters, as ``{"adapters": [{"name", "path"}]}`` with paths relative to the
    adapter root; rewritten atomically after every runtime load or unload."""

    VERSION = 1

    def __init__(self, path):
        self.path = Path(path).expanduser()

    def read(self) -> list[tuple[str, str]]:
        """(name, path) pairs; [] when the file does not exist yet. ValueError naming the file when it
        cannot be used."""
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            entries = data["adapters"]
            pairs = [(str(e["name"]), str(e["path"])) for e in entries]
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as e:
            raise ValueError(f"--state-file {self.path} is not a state file this server wrote: {e}") from e
        if data.get("version", self.VERSION) != self.VERSION:
            raise ValueError(f"--state-file {self.path} has version {data.get('version')!r}; this server reads "
                             f"version {self.VERSION}")
        return pairs

    def write(self, pairs: list[tuple[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {"version": self.VERSION, "adapters": [{"name": n, "path": p} for n, p in pairs]}
        with open(tmp, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # a crash mid-write leaves the previous state, never half of one


def replay_state(engine, state: StateFile, root: Optional[Path], taken: set) -> dict[str, str]:
    """Load the adapters ``state`` records (names in ``taken`` are skipped); returns name -> path of those
    loaded. One that cannot be loaded now is logged and left out, and so drops from the file at its next
    write: the file always lists what the server serves."""
    loaded: dict[str, str] = {}
    for name, rel in state.read():
        if name in taken or name in loaded:
            log.warning("state file: %r is already loaded (--adapter); not loading it from %s", name, rel)
            continue
        try:
            check_adapter_name(name)
            path = resolve_adapter_path(root, rel)
            engine.load_adapter(name, str(path))
        except (APIError, AdapterError, ModelError) as e:
            message = e.message if isinstance(e, APIError) else str(e)
            log.warning("state file: cannot load %r from %s, dropped: %s", name, rel, redact_paths(message, root))
            continue
        loaded[name] = shown_path(path, root)
        log.info("state file: loaded adapter %r from %s", name, loaded[name])
    return loaded


class AdapterAdmin:
    """Which adapters requests may name, and the load/unload calls of the HTTP API.

    Every coroutine runs on the event loop; the blocking work goes to one worker thread, which also
    orders loads and unloads (and their state-file writes) one after the other."""

    def __init__(self, engine, loop: EngineLoop, root: Optional[Path], model_name: str,
                 state: Optional[StateFile] = None, runtime: Optional[dict] = None, hidden_paths: tuple = ()):
        self.engine, self.loop, self.root, self.model_name, self.state = engine, loop, root, model_name, state
        # Kept here rather than asked of the engine for every request: the engine's list is O(adapters).
        self.names: set[str] = {info.name for info in engine.list_adapters()}
        self.runtime: dict[str, str] = dict(runtime or {})  # loaded through the API (or replayed): name -> path
        self.hidden_paths = hidden_paths
        self.inflight: Counter = Counter()  # adapter -> engine requests of handlers still open
        self.draining: dict[str, asyncio.Event] = {}  # adapter -> set when its last request is done
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="slora-adapter-io")

    # ------------------------------------------------------------------ requests
    def adapter_for(self, model: str) -> Optional[str]:
        """None for the base model's name, else the adapter name; 404 when unknown or being unloaded."""
        if model == self.model_name:
            return None
        if model in self.draining:
            raise model_not_found(f"the model {model!r} is being unloaded")
        if model not in self.names and self._engine_has(model):
            self.names.add(model)  # registered with the engine by other means (a Python caller, say)
        if model not in self.names:
            raise model_not_found(f"the model {model!r} does not exist: use {self.model_name!r} (the base model) "
                                  f"or a loaded adapter's name (GET /v1/models lists them)")
        return model

    def _engine_has(self, name: str) -> bool:
        return self.engine.has_adapter(name)

    def acquire(self, adapter: Optional[str], count: int) -> None:
        """Count ``count`` new engine requests for ``adapter``; 404 if its drain began after the handler
        checked the name (while it tokenized)."""
        if adapter is None:
            return
        if adapter in self.draining:
            raise model_not_found(f"the model {adapter!r} is being unloaded")
        self.inflight[adapter] += count

    def release(self, adapter: Optional[str], count: int) -> None:
        if adapter is None:
            return
        self.inflight[adapter] -= count
        if self.inflight[adapter] <= 0:
            del self.inflight[adapter]
            done = self.draining.get(adapter)
            if done is not None:
                done.set()

    # ------------------------------------------------------------------ load / unload
    async def load(self, name: str, requested_path: str):
        """Validate, read and register an adapter under the root; returns its AdapterInfo."""
        check_adapter_name(name)
        if name == self.model_name:
            raise bad_request(f"{name!r} is the base model's name", "lora_name")

        def work():
            path = resolve_adapter_path(self.root, requested_path)
            info = self.engine.load_adapter(name, str(path))
            self.names.add(name)
            self.runtime[name] = shown_path(path, self.root)
            self._write_state()
            return info

        info = await self._run(work)
        self.loop.refresh_snapshot()
        return info

    async def adopt(self, name: str, path: str):
        """Register an adapter the operator named at start (``--adapter``): its folder may lie outside the
        adapter root, and it is not a runtime change, so the state file does not record it."""
        check_adapter_name(name)

        def work():
            info = self.engine.load_adapter(name, str(path))
            self.names.add(name)
            return info

        info = await self._run(work)
        self.loop.refresh_snapshot()
        return info

    async def unload(self, name: str, drain: bool = False, timeout_s: Optional[float] = None) -> None:
        """Unregister ``name``. Without ``drain``, refused (400) while requests use it. With ``drain``,
        new requests for it get 404 at once, the ones in flight finish, then it goes; if they have not
        finished within ``timeout_s`` it serves again and the call answers 400."""
        if name not in self.names or name in self.draining:
            raise model_not_found(f"adapter {name!r} is not loaded" if name not in self.draining
                                  else f"adapter {name!r} is already being unloaded")
        if not drain:
            await self._run(lambda: self._unload_now(name))
        else:
            timeout_s = DEFAULT_DRAIN_TIMEOUT_S if timeout_s is None else timeout_s
            done = self.draining[name] = asyncio.Event()
            if not self.inflight.get(name):
                done.set()
            try:
                deadline = time.monotonic() + timeout_s
                try:
                    await asyncio.wait_for(done.wait(), timeout_s)
                except asyncio.TimeoutError:
                    raise bad_request(f"adapter {name!r} still has {self.inflight.get(name, 0)} request(s) in "
                                      f"flight after {timeout_s:g} s; it was not unloaded and serves again",
                                      "drain_timeout")
                # The handlers are done; the engine may not have processed their last aborts yet.
                while True:
                    try:
                        await self._run(lambda: self._unload_now(name))
                        break
                    except APIError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.05)
            finally:
                self.draining.pop(name, None)
        self.loop.refresh_snapshot()

    def _unload_now(self, name: str) -> None:
        self.engine.unload_adapter(name)
        self.names.discard(name)
        if self.runtime.pop(name, None) is not None:
            self._write_state()

    def _write_state(self) -> None:
        """Record ``runtime`` (on the worker thread, which runs one load or unload at a time)."""
        if self.state is None:
            return
        try:
            self.state.write(sorted(self.runtime.items()))
        except OSError as e:  # the change itself stands; say loudly that it will not survive a restart
            log.error("cannot write --state-file %s: %s", self.state.path, e)

    async def _run(self, fn):
        """``fn()`` on the adapter worker thread; engine and path errors become HTTP errors."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, fn)
        except APIError as e:
            e.message = redact_paths(e.message, self.root, self.hidden_paths)
            raise
        except UnknownAdapterError as e:
            raise model_not_found(redact_paths(str(e), self.root, self.hidden_paths))
        except (AdapterError, ModelError) as e:
            raise bad_request(redact_paths(str(e), self.root, self.hidden_paths))

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
