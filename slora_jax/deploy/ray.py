"""``slora-jax serve --replicas N``: N engines behind one OpenAI-compatible endpoint on Ray Serve, each
request routed by its adapter with Serve's model multiplexing.

    client --HTTP, --port--> ingress (OpenAIIngress) --handle, multiplexed_model_id=<adapter>--> EngineReplica x N
                                                                                               |  one Engine each
                                                             AdapterCatalog (deployment actor) <-- watch / report

- How requests reach the ingress (``--ray-ingress``). ``proxy``, the default: Serve's HTTP proxy on
  ``--port``; an ingress replica that dies is replaced behind it. ``direct``, on request when ``serve``
  starts its own Ray instance: Serve runs throughput-optimized (``direct_ingress_env``) and the one ingress
  replica serves HTTP on ``--port`` itself, so requests skip the proxy (on 2 x H200, +6.1 ms per request
  over one engine instead of +12.2; benchmarks/NOTES.md), and the replicas talk over gRPC. The proxy still
  runs, on another free port. Not the default because Serve binds the ingress's port without SO_REUSEADDR
  and gives up a port it failed to bind: an ingress replica that dies comes back on ``--port`` only if no
  connection closed there lingers (TIME_WAIT), else ``--port`` stays closed until the command restarts (the
  proxy's port still answers). A running cluster that ``serve`` joins keeps the mode its processes
  started with: proxy.
- The ingress reads only the request's ``model`` (``lora_name`` for adapter calls) and hands the raw
  request to a replica; Serve sends it to a replica that already holds that adapter (each replica keeps
  its own LRU of adapter ids), so an adapter's requests stick to the replicas that hold it. The base
  model's name is no adapter id: its requests go wherever there is room.
- A replica answers through the very app of ``slora-jax serve`` (slora_jax.server.app.create_app), called in
  its own process (slora_jax.deploy.asgi): same routes, schemas, validation and OpenAI errors. Each answer
  carries ``x-slora-replica``. Streams come back through Ray's streaming responses, chunk by chunk.
- Runtime loads and unloads reach every replica: the replica that served the call records it in the
  catalog, and the call returns once every live replica has applied it (``replicas`` in the body). A
  replica started later (scaled up, or replacing a dead one) starts from the catalog.
- /v1/models is the union of the replicas' lists; /metrics is every replica's metrics with a ``replica``
  label. Ray's own Prometheus export also gets ``slora_adapter_requests`` per adapter (Serve adds the
  replica, deployment and application tags).
- A replica that dies is replaced by Serve; a request it had not started answering is retried on another
  replica (``retries`` times), and a stream it dies in ends with an OpenAI error event, then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

try:
    import ray
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.config import DeploymentActorConfig
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
except ImportError as e:  # the CLI turns this into one line that names the extra
    from slora_jax.deploy import RAY_EXTRA
    raise ImportError(f"slora_jax.deploy.ray needs Ray Serve: {RAY_EXTRA}") from e

from slora_jax.deploy.asgi import HttpCall, Lifespan, ResponseStart, call_app
from slora_jax.deploy.fleet import WATCH_S, AdapterCatalog, merge_metrics, routing, union_models
from slora_jax.server.errors import APIError, error_body

log = logging.getLogger("slora_jax.deploy")

REPLICA_HEADER = b"x-slora-replica"
RETRIED_HEADER = b"x-slora-retried"  # how many replicas died under this request before one answered it
# Where a non-streaming answer's time went, as the standard Server-Timing header: "replica" (the engine
# replica's handling, engine included) and "ingress" (from the ingress receiving the body to its reply, the
# replica's time included). The client's own total minus "ingress" is Serve's HTTP proxy and the network.
TIMING_HEADER = b"server-timing"
CATALOG = "adapter_catalog"
APP_NAME = "slora-jax"
# A replica that died or cannot be reached; anything else a replica raises is a bug, not a reason to retry.
REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
_ADAPTER_CALLS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


@dataclass(frozen=True)
class ReplicaOptions:
    """How engine replicas are placed and scaled.

    replicas: a fixed count, unless ``autoscaling`` is given (Ray's autoscaling_config: min_replicas,
    max_replicas, target_ongoing_requests, ...; see ``autoscaling_config``). num_gpus: GPUs of each replica
    (its tensor-parallel group; 0 on a CPU host). max_ongoing_requests: requests a replica takes before
    Serve routes elsewhere (the engine batches them, so this is its batch, not Serve's default of 5).
    max_adapters_per_replica: adapter ids a replica advertises to the router (its LRU); past it, the least
    recently used id is forgotten by the router, not unloaded (the engine's own pool decides that).
    retries: attempts of a request whose replica died before answering. drain_s: what a stopping replica
    gives its requests in flight."""

    replicas: int = 2
    autoscaling: Optional[dict] = None
    num_gpus: float = 0
    num_cpus: float = 1
    max_ongoing_requests: int = 256
    max_adapters_per_replica: int = 64
    retries: int = 3
    drain_s: float = 30.0
    health_check_period_s: float = 2.0
    load_timeout_s: float = 60.0
    extra: dict = field(default_factory=dict)  # more serve.deployment options for the engine deployment

    def __post_init__(self):
        if self.autoscaling is None and (not isinstance(self.replicas, int) or self.replicas < 1):
            raise ValueError(f"replicas must be a positive integer, got {self.replicas!r}")
        if self.retries < 1:
            raise ValueError(f"retries must be at least 1, got {self.retries}")
        if self.max_ongoing_requests < 1 or self.max_adapters_per_replica < 1:
            raise ValueError("max_ongoing_requests and max_adapters_per_replica must be at least 1")


def autoscaling_config(min_replicas: int, max_replicas: int, target_ongoing_requests: float = 64.0,
                       **more) -> dict:
    """Ray Serve's autoscaling_config for the engine deployment: between ``min_replicas`` and
    ``max_replicas`` replicas, aiming at ``target_ongoing_requests`` requests in flight per replica."""
    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got {min_replicas}, "
                         f"{max_replicas}")
    if target_ongoing_requests <= 0:
        raise ValueError(f"target_ongoing_requests must be positive, got {target_ongoing_requests}")
    return {"min_replicas": min_replicas, "max_replicas": max_replicas,
            "initial_replicas": max(min_replicas, 1), "target_ongoing_requests": target_ongoing_requests,
            **more}


async def _hold_adapter(model_id: str) -> str:
    # What Serve's multiplexing keeps per replica is the routing record "this replica holds model_id"; the
    # adapter's weights are the engine's to page in and out, so there is nothing to load or free here.
    return model_id


class EngineReplica:
    """One Engine and the ``slora-jax serve`` app over it. ``make_setup()`` returns a
    slora_jax.server.app.ServeSetup (or a subclass): how to build the engine and the app."""

    async def __init__(self, make_setup: Callable, options: ReplicaOptions):
        self.id = serve.get_replica_context().replica_id.unique_id
        self.options = options
        self.setup = make_setup()
        self.catalog = serve.get_deployment_actor(CATALOG)
        self.epoch, self.version, entries = await self.catalog.watch.remote(self.id, None, 0, None, 0.0)
        startup = [(n, e["path"]) for n, e in entries.items() if not e["runtime"]]
        self.engine = await asyncio.to_thread(self.setup.load_engine, startup)
        self.app = self.setup.create_app(self.engine, self.setup.lifecycle())
        self.server = self.app.state.server
        self.lifespan = Lifespan(self.app)
        await self.lifespan.start()
        self.applied: set[str] = {n for n, _ in startup}  # names served because the catalog lists them
        self.errors = await self._apply(entries)  # the runtime ones, checked against the adapter root
        self.hold = serve.multiplexed(max_num_models_per_replica=options.max_adapters_per_replica)(_hold_adapter)
        from ray.serve import metrics as serve_metrics
        self.adapter_requests = serve_metrics.Counter(
            "slora_adapter_requests", description="HTTP requests each replica served, by adapter ('' = base).",
            tag_keys=("adapter",))
        self.watcher = asyncio.get_running_loop().create_task(self._watch())
        log.info("replica %s serving with %d adapter(s)", self.id, len(self.server.admin.names))

    # ------------------------------------------------------------------ requests
    async def handle(self, call: HttpCall):
        """Answer ``call`` with the app: a ResponseStart, then body chunks (a streaming generator)."""
        adapter = serve.get_multiplexed_model_id()
        if adapter and adapter in self.server.admin.names:
            await self.hold(adapter)  # tells the router this replica holds it: its next requests come here
        self.adapter_requests.inc(tags={"adapter": adapter})
        if call.path in _ADAPTER_CALLS and call.method == "POST":
            yield await self._adapter_call(call)
            return
        if call.method == "GET" and call.path in ("/v1/models", "/metrics"):
            start, body = await self._collect(call)
            if start.status == 200:
                body = await (self._union_models(body) if call.path == "/v1/models" else self._merged_metrics(body))
            yield self._stamp(start)
            yield body
            return
        async for part in call_app(self.app, call):
            yield self._stamp(part) if isinstance(part, ResponseStart) else part

    async def answer(self, call: HttpCall) -> ResponseStart:
        """``handle`` in one reply, the body with the start: one message back instead of a stream of them."""
        t0 = time.perf_counter()
        start, body = await _gather(self.handle(call))
        if start.body is None:
            start.body = body
        start.headers.append((TIMING_HEADER, _timing("replica", t0)))
        return start

    def _stamp(self, start: ResponseStart) -> ResponseStart:
        start.headers.append((REPLICA_HEADER, self.id.encode()))
        return start

    async def _collect(self, call: HttpCall) -> tuple[ResponseStart, bytes]:
        return await _gather(call_app(self.app, call))

    async def _adapter_call(self, call: HttpCall) -> ResponseStart:
        """Load or unload here (the app checks the name, the path and the key), then on every replica."""
        start, body = await self._collect(call)
        if start.status != 200:
            start.body = body
            return self._stamp(start)
        request = json.loads(call.body)
        name = request["lora_name"]
        loading = call.path == "/v1/load_lora_adapter"
        epoch, version = await self.catalog.change.remote(name, request["lora_path"] if loading else None)
        (self.applied.add if loading else self.applied.discard)(name)
        reached = await self.catalog.wait_applied.remote(epoch, version, self.options.load_timeout_s)
        answer = json.loads(body)
        answer["replicas"] = {rid: _outcome(report, name) for rid, report in reached.items()}
        start.body = json.dumps(answer).encode()
        return self._stamp(start)

    async def _union_models(self, own: bytes) -> bytes:
        lists = {rid: report["models"] for rid, report in (await self.catalog.reports.remote()).items()}
        lists[self.id] = json.loads(own)
        return json.dumps(union_models(lists)).encode()

    async def _merged_metrics(self, own: bytes) -> bytes:
        texts = {rid: report["metrics"] for rid, report in (await self.catalog.reports.remote()).items()}
        texts[self.id] = own.decode()
        return merge_metrics(texts)

    # ------------------------------------------------------------------ catalog
    async def _report(self) -> dict:
        from slora_jax.server.app import model_list

        state = self.server
        state.metrics.set_engine_snapshot(None, None, up=state.loop.alive)
        adapters = await asyncio.to_thread(self.engine.list_adapters)
        return {"models": model_list(state, adapters), "metrics": state.metrics.render().decode(),
                "errors": dict(self.errors)}

    async def _watch(self) -> None:
        """Check in with the catalog, apply what changed, report; for as long as the replica lives."""
        while True:
            try:
                epoch, version, entries = await self.catalog.watch.remote(self.id, self.epoch, self.version,
                                                                        await self._report(), WATCH_S)
                if (epoch, version) != (self.epoch, self.version):
                    self.errors = await self._apply(entries)
                    self.epoch, self.version = epoch, version
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the catalog restarting: find its new instance
                log.warning("replica %s: adapter catalog unreachable (%s); retrying", self.id, e)
                await asyncio.sleep(WATCH_S)
                try:
                    self.catalog = serve.get_deployment_actor(CATALOG)
                except Exception:
                    pass

    async def _apply(self, entries: dict) -> dict[str, str]:
        """Serve exactly the catalog's adapters (besides those loaded on request here); name -> error."""
        admin, errors = self.server.admin, {}
        for name in sorted(self.applied - set(entries)):
            if name in admin.names:
                try:
                    await admin.unload(name, drain=True)
                except APIError as e:
                    errors[name] = e.message
        for name, entry in sorted(entries.items()):
            if name in admin.names:
                continue
            try:
                await (admin.load if entry["runtime"] else admin.adopt)(name, entry["path"])
            except APIError as e:
                errors[name] = e.message
                log.warning("replica %s: cannot serve adapter %r: %s", self.id, name, e.message)
        self.applied = set(entries)
        return errors

    # ------------------------------------------------------------------ life
    def check_health(self) -> None:
        """Serve replaces a replica whose engine thread stopped."""
        if not self.server.loop.alive:
            raise RuntimeError(f"replica {self.id}: the engine thread stopped")

    async def __del__(self):
        self.watcher.cancel()
        await self.lifespan.stop()


async def _gather(parts) -> tuple[ResponseStart, bytes]:
    """A response's start and its whole body, from the parts ``call_app`` or ``handle`` yield."""
    start, chunks = None, []
    async for part in parts:
        if isinstance(part, ResponseStart):
            start = part
        else:
            chunks.append(part)
    return start, b"".join(chunks)


def _outcome(report: Optional[dict], name: str) -> str:
    if report is None:
        return "not reached"
    return report.get("errors", {}).get(name) or "ok"


class OpenAIIngress:
    """The HTTP entry: routes each request to an engine replica by its adapter, retries a request whose
    replica died before answering, relays the answer (streams chunk by chunk)."""

    def __init__(self, engine, base_model: str, retries: int = 3):
        self.engine, self.base_model, self.retries = engine, base_model, retries

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response, StreamingResponse

        call = HttpCall(request.method, request.url.path, request.url.query.encode(), list(request.headers.raw),
                        await request.body())
        t0 = time.perf_counter()
        model, stream = routing(call, self.base_model)
        handle = self.engine.options(multiplexed_model_id=model, stream=stream)
        failure = None
        for attempt in range(self.retries):
            start = None
            try:
                if not stream:  # one reply: the whole answer, retried whole if its replica died
                    start = await handle.answer.remote(call)
                    start.headers.append((TIMING_HEADER, _timing("ingress", t0)))
                    return _with_headers(Response(start.body, status_code=start.status), start, attempt)
                answer = handle.handle.remote(call)
                start = await answer.__anext__()
                # Wait for the first event too: a replica that dies before it is retried like any other.
                first = b"" if start.body is not None else await answer.__anext__()
            except StopAsyncIteration:  # a stream that ended before its first chunk: an empty body
                if start is None:
                    return JSONResponse(error_body("the replica gave no answer", "server_error", "internal_error"),
                                        status_code=500)
                first = b""
            except REPLICA_GONE as e:
                failure = e
                log.warning("request %s %s: replica gone (%s); attempt %d of %d", call.method, call.path,
                            type(e).__name__, attempt + 1, self.retries)
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if start.body is not None or not start.is_stream:
                body = start.body if start.body is not None else first + b"".join([c async for c in answer])
                return _with_headers(Response(body, status_code=start.status), start, attempt)
            return _with_headers(StreamingResponse(_relay(first, answer), status_code=start.status), start, attempt)
        return JSONResponse(error_body(f"the replicas that took this request stopped before answering "
                                       f"({self.retries} attempts; last: {type(failure).__name__}); retry it",
                                       "service_unavailable", "replica_failed"), status_code=503,
                            headers={"Retry-After": "1"})


def _timing(name: str, t0: float) -> bytes:
    return f"{name};dur={(time.perf_counter() - t0) * 1e3:.3f}".encode()


def _with_headers(response, start: ResponseStart, retries: int):
    response.raw_headers.extend(start.headers)
    if retries:  # the request outlived a replica: say so, for clients and for the fault tests
        response.raw_headers.append((RETRIED_HEADER, str(retries).encode()))
    return response


async def _relay(first: bytes, answer):
    yield first
    try:
        async for chunk in answer:
            yield chunk
    except REPLICA_GONE as e:  # tokens already went out: the request cannot move, so it ends with an error
        event = error_body(f"the replica serving this stream stopped ({type(e).__name__}); the answer is "
                           "incomplete", "service_unavailable", "replica_failed")
        yield b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n"


def build_app(make_setup: Callable, options: ReplicaOptions = ReplicaOptions()):
    """The Serve application: ``serve.run(build_app(...), route_prefix="/")``. ``make_setup()`` must work
    both here and on every replica (a picklable callable: ``functools.partial(ServeSetup, args)``)."""
    setup = make_setup()  # checks the flags here, before any replica starts
    engine, ingress = deployments(setup, options)
    return ingress.bind(engine.bind(make_setup, options), setup.model_name, options.retries)


def deployments(setup, options: ReplicaOptions):
    """The engine deployment (with the adapter catalog as its deployment actor) and the ingress, unbound."""
    state_file = str(setup.state_file.path) if setup.state_file is not None else None
    catalog = DeploymentActorConfig(name=CATALOG, actor_class=ray.remote(AdapterCatalog),
                                    init_kwargs={"adapters": list(setup.adapters), "state_file": state_file},
                                    actor_options={"num_cpus": 0})
    scale = {"autoscaling_config": options.autoscaling} if options.autoscaling else \
        {"num_replicas": options.replicas}
    engine = serve.deployment(
        EngineReplica, name="SloraEngine", max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_gpus": options.num_gpus, "num_cpus": options.num_cpus},
        health_check_period_s=options.health_check_period_s, graceful_shutdown_timeout_s=options.drain_s,
        deployment_actors=[catalog], **scale, **options.extra)
    # The ingress only parses a field and relays bytes; it takes many requests at once. One replica: with
    # direct ingress it owns the user's port, which a second replica on the same node could not bind.
    ingress = serve.deployment(OpenAIIngress, name="SloraIngress", num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0})
    return engine, ingress


def options_from_args(args) -> ReplicaOptions:
    """The ReplicaOptions of a ``serve`` namespace (slora_jax.cli)."""
    auto = None
    if args.max_replicas is not None:
        auto = autoscaling_config(args.min_replicas if args.min_replicas is not None else 1, args.max_replicas,
                                  args.target_ongoing_requests)
    gpus = args.replica_gpus
    if gpus is None:  # a replica owns its tensor-parallel group's GPUs, when the host has GPUs
        gpus = args.tensor_parallel if (ray.cluster_resources().get("GPU", 0) > 0) else 0
    return ReplicaOptions(replicas=args.replicas or 1, autoscaling=auto, num_gpus=gpus,
                          num_cpus=args.replica_cpus, max_ongoing_requests=args.max_ongoing_requests,
                          max_adapters_per_replica=args.max_loras or 64,
                          drain_s=getattr(args, "drain_timeout", 30.0) or 30.0)


def direct_ingress_env(port: int) -> dict[str, str]:
    """The environment that makes Ray Serve's ingress replica answer HTTP on ``port`` itself (Ray 2.60's
    throughput-optimized mode: direct ingress, gRPC between replicas). Serve reads it when its processes
    start, so it must be in place before ``ray.init`` starts the local instance."""
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
           # Serve's controller hands each ingress replica the lowest port of [MIN, MAX) that is not taken
           # (MAX excluded): a range of exactly ``port``. A wider one would let the replica settle silently
           # on the next port when ``port`` is busy, where no client looks.
           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1)}
    # Serve holds a released port back (150 s) and keeps a stopping ingress open (30 s) for load balancers
    # in front of many replica ports; here clients come straight to the one port, so a replacement ingress
    # takes it back at once and a stop waits only for the requests in flight. Left to the user if set.
    for key in ("RAY_SERVE_PORT_QUARANTINE_S", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        env[key] = os.environ.get(key, "0")
    return env


def hold_port_for_ingress(host: str, port: int, wait_s: float = 70.0):
    """A socket bound to (host, port) the way Serve's ingress replica binds it, without SO_REUSEADDR; held
    until Serve starts. Connections closed on a port keep it busy for up to a minute (TIME_WAIT), for any
    bind when the server that closed them had no SO_REUSEADDR either (the ingress replica of a previous run
    of this command): that is waited out, rather than have Serve fail to bind the port and give it up. A
    port where something listens is a StartupError at once, as is one still busy after ``wait_s``."""
    import socket

    from slora_jax.server.lifecycle import say
    from slora_jax.server.startup import StartupError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline, told = time.monotonic() + wait_s, False
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
            return sock
        except OSError as e:
            sock.close()
            error = e
        if _listening(family, host, port):
            raise StartupError(f"cannot listen on {host}:{port}: already in use (choose another --port)")
        if time.monotonic() > deadline:
            raise StartupError(f"cannot listen on {host}:{port}: {error.strerror or error} after {wait_s:g} s "
                               "(connections closed there still hold it; choose another --port)")
        if not told:
            say(f"waiting for connections closed on port {port} to expire (up to a minute)")
            told = True
        time.sleep(0.5)


def _listening(family, host: str, port: int) -> bool:
    import socket

    target = host if host not in ("", "0.0.0.0", "::") else ("::1" if family == socket.AF_INET6 else "127.0.0.1")
    try:
        socket.create_connection((target, port), timeout=2).close()
        return True
    except OSError:
        return False


def run(args) -> int:
    """``slora-jax serve --replicas N``: start (or join, ``--ray-address``) a Ray cluster, run the app on it,
    serve until SIGTERM/SIGINT, then take the app down."""
    import functools

    from slora_jax.deploy import ingress_mode, joins_cluster
    from slora_jax.server.app import ServeSetup, configure_logging
    from slora_jax.server.lifecycle import say
    from slora_jax.server.startup import StartupError, bind, preflight

    configure_logging(args)
    mode = ingress_mode(args)
    setup = ServeSetup(args)
    args.api_key = setup.api_key  # resolved here (flag or environment), so every replica checks the same key
    if mode == "direct" and args.port:  # what a previous run left on the port fails preflight's bind too
        hold_port_for_ingress(args.host, args.port).close()
    sock = preflight(args, setup.adapters)  # files, folders and a free port, before anything starts
    port = sock.getsockname()[1]
    if mode == "direct":
        sock.close()
        sock = hold_port_for_ingress(args.host, port)
    # Serve's proxy binds a port even when the ingress answers on its own: any free one then. Both stay held
    # here until just before Serve binds them, so that none of the processes Ray starts meanwhile takes one.
    proxy_sock = bind(args.host, 0) if mode == "direct" else sock
    proxy_port = proxy_sock.getsockname()[1]
    # Replicas run in Ray's worker processes: they get this command's JAX/XLA settings and import path.
    env = {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_")) or k == "PYTHONPATH"}
    if mode == "direct":
        ingress_env = direct_ingress_env(port)
        os.environ.update(ingress_env)  # the local instance's processes inherit it
        env.update(ingress_env)
    # Not Ray's default (a cluster `ray start` left on this machine): the instance whose settings are set here.
    ray.init(address=args.ray_address if joins_cluster(args) else "local",
             runtime_env={"env_vars": env} if env else None)
    if not joins_cluster(args):
        say(f"started a local Ray instance at {ray.get_runtime_context().gcs_address}")
    try:
        options = options_from_args(args)
    except ValueError as e:
        raise StartupError(str(e))
    scale = (f"{options.autoscaling['min_replicas']}-{options.autoscaling['max_replicas']} autoscaled"
             if options.autoscaling else str(options.replicas))
    proxy_sock.close()
    serve.start(http_options={"host": args.host, "port": proxy_port})
    say(f"starting {setup.model_name!r} on {scale} replica(s) behind {args.host}:{port} (Ray Serve, "
        f"{'the ingress replica answering itself' if mode == 'direct' else 'its HTTP proxy'})")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        sock.close()  # the ingress replica binds it (direct), or the proxy already has
        try:
            serve.run(build_app(functools.partial(ServeSetup, args), options), name=APP_NAME, route_prefix="/")
        except RuntimeError:
            if mode == "direct":  # the likely cause, said plainly: the port was taken since the check
                hold_port_for_ingress(args.host, port, wait_s=0).close()
            raise
        say(f"serving {setup.model_name!r} on http://{args.host}:{port} ({scale} replica(s))")
        if mode == "direct":
            say(f"Serve's HTTP proxy (one hop more) also answers, on http://{args.host}:{proxy_port}")
        while not stop.wait(1.0):
            pass
    finally:
        say("shutting down the replicas")
        serve.delete(APP_NAME)
        serve.shutdown()
        ray.shutdown()
    return 0


def wait_ready(url: str, timeout_s: float = 300.0) -> None:
    """Block until ``url``/health answers 200 (every route is served from then on)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become ready in {timeout_s:g} s")
        time.sleep(0.2)
