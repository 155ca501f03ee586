"""The pieces the replicas share, without Ray: the adapter catalog, routing by the body's model, the union of
model lists, merged metrics, the in-process ASGI call and the CLI's word when Ray is missing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from slora_jax.deploy.asgi import HttpCall, ResponseStart, call_app
from slora_jax.deploy.fleet import AdapterCatalog, merge_metrics, routing, union_models
from tests.deploy.conftest import ROOT


def run(coro):
    return asyncio.run(coro)


def test_catalog_waits_for_every_live_replica_and_persists_runtime_adapters(tmp_path):
    state = tmp_path / "state.json"

    async def scenario():
        cat = AdapterCatalog([("a0", "/models/a0")], str(state))
        epoch, version, entries = await cat.watch("r1", None, 0, None, 0.0)
        assert entries == {"a0": {"path": "/models/a0", "runtime": False}}
        await cat.watch("r2", epoch, version, {"models": {}}, 0.0)
        epoch, v2 = await cat.change("late", "late")
        assert v2 == version + 1
        # r1 applied it, r2 not yet: the wait ends at its timeout with r2 not reached.
        await cat.watch("r1", epoch, v2, {"errors": {}}, 0.0)
        reached = await cat.wait_applied(epoch, v2, 0.1)
        assert reached == {"r1": {"errors": {}}, "r2": None}
        await cat.watch("r2", epoch, v2, {"errors": {"late": "bad"}}, 0.0)
        assert await cat.wait_applied(epoch, v2, 1.0) == {"r1": {"errors": {}}, "r2": {"errors": {"late": "bad"}}}
        # A watch at the current version returns as soon as something changes.
        waiter = asyncio.ensure_future(cat.watch("r1", epoch, v2, None, 10.0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await cat.change("late", None)
        _, v3, entries = await asyncio.wait_for(waiter, 1.0)
        assert v3 == v2 + 1 and set(entries) == {"a0"}
        return cat

    run(scenario())
    assert json.loads(state.read_text())["adapters"] == []
    # A restarted catalog replays the runtime adapters and is a new epoch: no replica counts as caught up.
    state.write_text(json.dumps({"version": 1, "adapters": [{"name": "late", "path": "late"}]}))

    async def restarted():
        cat = AdapterCatalog([], str(state))
        await cat.watch("r1", "old-epoch", 99, {}, 0.0)
        return cat, await cat.wait_applied(cat.epoch, cat.version, 0.05)

    cat, reached = run(restarted())
    assert cat.entries == {"late": {"path": "late", "runtime": True}} and reached == {"r1": None}


def test_routing_reads_only_the_model_and_stream_fields():
    def call(path, body, method="POST"):
        return HttpCall(method, path, body=body if isinstance(body, bytes) else json.dumps(body).encode())

    assert routing(call("/v1/completions", {"model": "a1", "prompt": "x"}), "base") == ("a1", False)
    assert routing(call("/v1/chat/completions", {"model": "base", "stream": True}), "base") == ("", True)
    assert routing(call("/v1/load_lora_adapter", {"lora_name": "late"}), "base") == ("late", False)
    assert routing(call("/v1/completions", b"{broken"), "base") == ("", False)
    assert routing(call("/v1/completions", [1, 2]), "base") == ("", False)
    assert routing(call("/v1/completions", {"model": 7, "stream": "yes"}), "base") == ("", False)
    assert routing(call("/v1/models", {"model": "a1"}, "GET"), "base") == ("", False)


def test_union_lists_every_model_once_with_its_replicas():
    r1 = {"data": [{"id": "base", "location": "device"}, {"id": "a", "location": "device"}]}
    r2 = {"data": [{"id": "base", "location": "device"}, {"id": "a", "location": "disk"},
                   {"id": "b", "location": "host"}]}
    cards = {c["id"]: c for c in union_models({"r1": r1, "r2": r2})["data"]}
    assert cards["a"]["replicas"] == {"r1": "device", "r2": "disk"}
    assert cards["b"]["replicas"] == {"r2": "host"} and list(cards) == ["base", "a", "b"]


def test_merged_metrics_keep_families_together_with_a_replica_label():
    from prometheus_client.parser import text_string_to_metric_families

    text = ('# HELP slora_requests_total Done.\n# TYPE slora_requests_total counter\n'
            'slora_requests_total{model="a",finish_reason="stop"} 3.0\n'
            '# HELP slora_engine_up Up.\n# TYPE slora_engine_up gauge\nslora_engine_up 1.0\n')
    merged = merge_metrics({"r1": text, "r2": text.replace("3.0", "5.0")}).decode()
    fams = {f.name: f for f in text_string_to_metric_families(merged)}
    reqs = {s.labels["replica"]: s.value for s in fams["slora_requests"].samples if s.name.endswith("_total")}
    assert reqs == {"r1": 3.0, "r2": 5.0}
    assert merged.count("# TYPE slora_engine_up") == 1


def test_call_app_relays_status_headers_chunks_and_disconnects():
    closed = []

    async def app(scope, receive, send):
        assert (await receive())["body"] == b"ping"
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"text/event-stream"), (b"content-length", b"9")]})
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        try:
            await send({"type": "http.response.body", "body": b"two", "more_body": True})
            assert (await receive())["type"] == "http.disconnect"  # the reader went away
        finally:
            closed.append(True)

    async def scenario():
        parts = call_app(app, HttpCall("POST", "/x", body=b"ping"))
        start = await parts.__anext__()
        assert isinstance(start, ResponseStart) and start.status == 201 and start.is_stream
        assert start.header(b"content-length") == b""  # the next hop sets its own
        assert await parts.__anext__() == b"one"
        await parts.aclose()

    run(scenario())
    assert closed == [True]


@pytest.mark.slow  # a CLI process, ~3 s on two cores
def test_replicas_without_ray_name_the_extra(tmp_path, ray_files):
    shadow = tmp_path / "no_ray"
    shadow.mkdir()
    (shadow / "ray.py").write_text("raise ImportError('No module named ray', name='ray')\n")
    proc = subprocess.run([sys.executable, "-m", "slora_jax", "serve", "--model", str(ray_files["model"]),
                           "--replicas", "2"], capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{shadow}:{ROOT}", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--replicas 2" in last and "pip install 'slora-jax[ray]'" in last, proc.stderr


def test_replica_options_and_autoscaling_are_checked():
    pytest.importorskip("ray")
    from slora_jax.deploy.ray import ReplicaOptions, autoscaling_config

    auto = autoscaling_config(1, 4, target_ongoing_requests=32)
    assert auto["min_replicas"] == 1 and auto["max_replicas"] == 4 and auto["target_ongoing_requests"] == 32
    with pytest.raises(ValueError, match="min_replicas"):
        autoscaling_config(3, 2)
    with pytest.raises(ValueError, match="replicas"):
        ReplicaOptions(replicas=0)
    assert ReplicaOptions(replicas=0, autoscaling=auto).autoscaling == auto


def test_direct_ingress_only_on_a_ray_instance_serve_starts(monkeypatch, ray_files):
    import argparse

    from slora_jax.cli import _serve_args
    from slora_jax.deploy import ingress_mode
    from slora_jax.server.startup import StartupError

    parser = argparse.ArgumentParser()
    _serve_args(parser.add_subparsers())

    def mode(*flags):
        return ingress_mode(parser.parse_args(["serve", "--model", str(ray_files["model"]), "--replicas", "2",
                                               *flags]))

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert mode() == "proxy" and mode("--ray-ingress", "direct") == "direct"
    assert mode("--ray-address", "auto") == "proxy"
    with pytest.raises(StartupError, match="--ray-ingress direct"):
        mode("--ray-address", "auto", "--ray-ingress", "direct")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what `ray job submit` gives its entrypoint
    assert mode() == "proxy"


def test_direct_ingress_settings_name_exactly_the_port(monkeypatch):
    pytest.importorskip("ray")
    from slora_jax.deploy.ray import direct_ingress_env

    monkeypatch.delenv("RAY_SERVE_PORT_QUARANTINE_S", raising=False)
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "7")
    env = direct_ingress_env(8000)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # Serve's port range leaves out its upper end: [8000, 8001) is the one port.
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == \
        ("8000", "8001")
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0" and env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "7"


def test_the_ingress_port_waits_out_connections_a_server_closed():
    pytest.importorskip("ray")
    import socket

    from slora_jax.deploy.ray import hold_port_for_ingress
    from slora_jax.server.startup import StartupError, bind

    server = bind("127.0.0.1", 0)  # as preflight binds: SO_REUSEADDR
    port = server.getsockname()[1]
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server closes first: the port keeps a TIME_WAIT entry for a minute
    client.close()
    server.close()
    bind("127.0.0.1", port).close()  # what preflight checks still passes
    with pytest.raises(StartupError, match=f"127.0.0.1:{port}: .* after 0.3 s"):
        hold_port_for_ingress("127.0.0.1", port, wait_s=0.3)
    free = bind("127.0.0.1", 0)
    other = free.getsockname()[1]
    free.close()
    hold_port_for_ingress("127.0.0.1", other, wait_s=0).close()
    taken = bind("127.0.0.1", other)
    taken.listen()
    t0 = time.monotonic()
    with pytest.raises(StartupError, match="already in use"):  # a listener: no waiting
        hold_port_for_ingress("127.0.0.1", other, wait_s=30)
    assert time.monotonic() - t0 < 5
    taken.close()


@pytest.mark.slow  # starts a local Ray instance, ~9 s on two cores
def test_autoscaling_flags_reach_the_engine_deployment(ray_cluster, ray_files):
    import argparse

    from slora_jax.cli import _serve_args
    from slora_jax.deploy.ray import deployments, options_from_args
    from slora_jax.server.app import ServeSetup

    parser = argparse.ArgumentParser()
    _serve_args(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(ray_files["model"]), "--min-replicas", "1",
                              "--max-replicas", "4", "--target-ongoing-requests", "16"])
    options = options_from_args(args)
    assert options.num_gpus == 0  # no GPU in this Ray instance
    engine, ingress = deployments(ServeSetup(args), options)
    auto = engine._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 16)
    assert engine.max_ongoing_requests == 256 and engine.ray_actor_options["num_cpus"] == 1
