"""Loading an adapter by name on its first request, as LoRAX does: with ``--adapter-root``, a request whose
``model`` is no loaded adapter but names a folder under the root loads that folder under that name, then is
served.

The same confinement, name rules and validation as ``/v1/load_lora_adapter`` apply (both load through
AdapterAdmin, whose worker thread reads and validates: neither the event loop nor the engine thread waits on
the disk), and the load is recorded in ``--state-file`` like theirs. Concurrent requests for one name share
one load.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from slora_jax.server.adapter_admin import check_adapter_name
from slora_jax.server.errors import APIError
from slora_jax.server.paths import resolve_adapter_path


class AdapterAutoloader:
    """``await load(name)`` -> True once ``name`` is loaded, False when it names no adapter folder under the
    root (or loading on request is off). Loads go through the server's AdapterAdmin, as
    /v1/load_lora_adapter's do (name rules, confinement, the state file); its 400s reach the client."""

    def __init__(self, admin, enabled: bool, on_load: Callable[[str], None] = lambda _: None):
        self.admin = admin
        self.enabled = enabled and admin.root is not None
        self._on_load = on_load  # called with "ok" or "error" (metrics)
        self._loading: dict[str, asyncio.Future] = {}

    async def load(self, name: str) -> bool:
        if not self.enabled or name in self.admin.draining:
            return False
        pending = self._loading.get(name)
        if pending is not None:
            return await asyncio.shield(pending)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" warnings
        self._loading[name] = fut
        try:
            loaded = await self._load(name)
        except BaseException as e:
            fut.set_exception(e)
            raise
        else:
            fut.set_result(loaded)
            return loaded
        finally:
            del self._loading[name]

    async def _load(self, name: str) -> bool:
        # Looking at the disk runs in a worker thread: the event loop never waits on it.
        if not await asyncio.to_thread(self._is_adapter_folder, name):
            return False
        try:
            check_adapter_name(name)
            await self.admin.load(name, name)
        except APIError:
            if name in self.admin.names:  # loaded meanwhile through /v1/load_lora_adapter
                return True
            self._on_load("error")
            raise
        self._on_load("ok")
        return True

    def _is_adapter_folder(self, name: str) -> bool:
        try:
            path = resolve_adapter_path(self.admin.root, name)
        except APIError:  # outside the root, missing, or not a folder: to the client, no such model
            return False
        return (path / "adapter_config.json").is_file()
