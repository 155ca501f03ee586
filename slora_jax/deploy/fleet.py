"""What the replicas of one deployment share: the adapter catalog (which adapters every replica serves, and
whether each replica has caught up), and the merged views the endpoint answers with (the union of the
replicas' model lists, their metrics with a ``replica`` label).

Nothing here imports Ray: the catalog is a plain class that the Ray deployment runs as an actor.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Optional

from slora_jax.deploy.asgi import HttpCall
from slora_jax.server.adapter_admin import StateFile

# Replicas check in with the catalog at least this often, and one not heard from for LIVE_S is taken for
# gone: a load or unload waits only for the replicas that are live.
WATCH_S = 1.0
LIVE_S = 5.0
_FORGET_S = 60.0
# Routes whose body names the model (the adapter) that routing goes by, and the field that names it.
_MODEL_FIELD = {"/v1/completions": "model", "/v1/chat/completions": "model", "/tokenize": "model",
                "/detokenize": "model", "/v1/load_lora_adapter": "lora_name", "/v1/unload_lora_adapter": "lora_name"}
_MAX_ROUTED_BODY = 8 << 20  # larger bodies are not parsed for routing; the replica answers them 413


class AdapterCatalog:
    """The adapters every replica serves: name -> {"path", "runtime"}. ``runtime`` entries came through
    /v1/load_lora_adapter (their path is under the adapter root, and they are recorded in the state file);
    the others were named at start. Each change bumps ``version``; replicas watch for changes, apply them
    and report back with the version they reached. ``epoch`` changes when the catalog restarts, so that a
    version counted by an earlier catalog is never taken for one of this catalog."""

    def __init__(self, adapters: list[tuple[str, str]], state_file: Optional[str] = None):
        self.entries: dict[str, dict] = {name: {"path": str(path), "runtime": False} for name, path in adapters}
        self.state = StateFile(state_file) if state_file else None
        for name, path in (self.state.read() if self.state is not None else ()):
            self.entries.setdefault(name, {"path": path, "runtime": True})
        self.epoch = uuid.uuid4().hex
        self.version = 1
        self.replicas: dict[str, dict] = {}  # replica id -> {"epoch", "version", "seen", "report"}
        self._changed: Optional[asyncio.Event] = None  # made on the actor's event loop, at first use

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    async def watch(self, replica: str, epoch: Optional[str], version: int, report: Optional[dict],
                    timeout_s: float = WATCH_S) -> tuple[str, int, dict]:
        """A replica checks in: it has applied (``epoch``, ``version``) and serves what ``report`` says.
        Returns (epoch, version, entries) once there is a newer version, or after ``timeout_s``."""
        now = time.monotonic()
        self.replicas[replica] = {"epoch": epoch, "version": version, "seen": now,
                                  "report": report if report is not None else
                                  self.replicas.get(replica, {}).get("report")}
        for rid in [r for r, rec in self.replicas.items() if now - rec["seen"] > _FORGET_S]:
            del self.replicas[rid]
        if epoch == self.epoch and version >= self.version and timeout_s > 0:
            event = self._event()
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.epoch, self.version, {k: dict(v) for k, v in self.entries.items()}

    async def change(self, name: str, path: Optional[str]) -> tuple[str, int]:
        """Serve ``name`` from ``path`` on every replica (runtime load), or nowhere (``path`` None)."""
        if path is None:
            self.entries.pop(name, None)
        else:
            self.entries[name] = {"path": str(path), "runtime": True}
        self.version += 1
        if self.state is not None:
            self.state.write(sorted((n, e["path"]) for n, e in self.entries.items() if e["runtime"]))
        event, self._changed = self._event(), asyncio.Event()
        event.set()
        return self.epoch, self.version

    def live(self) -> dict[str, dict]:
        now = time.monotonic()
        return {rid: rec for rid, rec in self.replicas.items() if now - rec["seen"] <= LIVE_S}

    async def wait_applied(self, epoch: str, version: int, timeout_s: float) -> dict[str, Optional[dict]]:
        """Wait until every live replica has applied ``version`` (or ``timeout_s`` passed); returns replica
        id -> its report (None for a live replica that has not caught up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            live = self.live()
            done = {rid: rec["report"] for rid, rec in live.items()
                    if rec["epoch"] == epoch and rec["version"] >= version}
            if len(done) == len(live) or time.monotonic() > deadline:
                return {rid: done.get(rid) for rid in live}
            await asyncio.sleep(0.02)

    async def reports(self) -> dict[str, dict]:
        """The last report of every live replica: {"models": GET /v1/models' body, "metrics": text, ...}."""
        return {rid: rec["report"] for rid, rec in self.live().items() if rec["report"] is not None}


def routing(call: HttpCall, base_model: str) -> tuple[str, bool]:
    """(multiplexed model id, whether the answer streams) of ``call``. The id is the adapter its body names;
    "" for the base model, for routes that name none and for bodies that cannot be read (the replica
    answers those with the usual error)."""
    key = _MODEL_FIELD.get(call.path)
    if key is None or call.method != "POST" or len(call.body) > _MAX_ROUTED_BODY:
        return "", False
    try:
        body = json.loads(call.body)
        value, stream = body.get(key), body.get("stream") is True
    except (ValueError, AttributeError, RecursionError):
        return "", False
    return (value if isinstance(value, str) and value != base_model else ""), stream


def union_models(lists: dict[str, dict]) -> dict:
    """GET /v1/models over several replicas: every model any replica serves, once, each card with
    ``replicas``: replica id -> where that replica holds it ("device" | "host" | "disk")."""
    cards: dict[str, dict] = {}
    for rid in sorted(lists):
        for card in lists[rid].get("data", []):
            merged = cards.setdefault(card["id"], {**card, "replicas": {}})
            merged["replicas"][rid] = card.get("location")
    return {"object": "list", "data": list(cards.values())}


def merge_metrics(texts: dict[str, str], label: str = "replica") -> bytes:
    """Several Prometheus text expositions as one, each sample labelled with its replica
    (``label="<replica id>"``); samples of one metric stay together, as the format requires."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, object] = {}
    for rid in sorted(texts):
        for fam in text_string_to_metric_families(texts[rid]):
            merged = families.setdefault(fam.name, fam)
            relabelled = [Sample(s.name, {**s.labels, label: rid}, s.value, s.timestamp, s.exemplar)
                          for s in fam.samples]
            if merged is fam:
                fam.samples = relabelled
            else:
                merged.samples.extend(relabelled)

    class _Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)
