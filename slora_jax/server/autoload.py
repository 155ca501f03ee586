"""Loading an adapter by name on its first request, as LoRAX does: with ``--adapter-root``, a request whose
``model`` is no loaded adapter but names a folder under the root loads that folder under that name, then is
served.

The same confinement as ``/v1/load_lora_adapter`` applies (``resolve_adapter_path``), and the same
validation (``engine.load_adapter``). Reading and validating run in a worker thread: neither the event loop
nor the engine thread waits on the disk. Concurrent requests for one name share one load.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable, Optional

from slora_jax.errors import AdapterError
from slora_jax.server.errors import APIError, bad_request
from slora_jax.server.paths import resolve_adapter_path


class AdapterAutoloader:
    """``await load(name)`` -> True once ``name`` is loaded, False when it names no adapter folder under the
    root (or loading on request is off); AdapterError's message becomes a 400."""

    def __init__(self, engine, root: Optional[Path], enabled: bool, on_load: Callable[[str], None] = lambda _: None):
        self.engine = engine
        self.root = root
        self.enabled = enabled and root is not None
        self._on_load = on_load  # called with "ok" or "error" (metrics)
        self._loading: dict[str, asyncio.Future] = {}

    async def load(self, name: str) -> bool:
        if not self.enabled:
            return False
        pending = self._loading.get(name)
        if pending is not None:
            return await asyncio.shield(pending)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" warnings
        self._loading[name] = fut
        try:
            loaded = await asyncio.to_thread(self._load, name)
        except BaseException as e:
            fut.set_exception(e)
            raise
        else:
            fut.set_result(loaded)
            return loaded
        finally:
            del self._loading[name]

    def _load(self, name: str) -> bool:
        """In a worker thread: find the folder, then read, validate and register it."""
        try:
            path = resolve_adapter_path(self.root, name)
        except APIError:  # outside the root, missing, or not a folder: to the client, no such model
            return False
        if not (path / "adapter_config.json").is_file():
            return False
        try:
            self.engine.load_adapter(name, str(path))
        except AdapterError as e:
            if name in self.engine.adapters:  # loaded meanwhile through /v1/load_lora_adapter
                return True
            self._on_load("error")
            raise bad_request(f"adapter folder {name!r} under the adapter root could not be loaded: {e}", "model")
        self._on_load("ok")
        return True
