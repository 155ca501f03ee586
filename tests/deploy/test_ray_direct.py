"""``serve --replicas 2 --ray-ingress direct``: Ray Serve throughput-optimized, the ingress replica answering
on the port given to ``serve`` itself and Serve's HTTP proxy on another port (test_ray.py covers the routes
in the default mode, through the proxy)."""

from __future__ import annotations

import sys

import httpx
import pytest

from tests.deploy.conftest import ADAPTERS, API_KEY, MODEL, REPLICAS, ROOT, listener, printed
from tests.deploy.test_ray import complete, replica_of
from tests.server.conftest import ServerProcess

pytestmark = [pytest.mark.slow]  # a Ray instance and two replicas: ~30 s on two cores


def test_the_ingress_replica_answers_on_the_port_and_serves_proxy_elsewhere(ray_files, server_env):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    argv = [sys.executable, "-m", "slora_jax", "serve", "--replicas", str(REPLICAS), "--ray-ingress", "direct",
            "--replica-cpus", "0.5", "--host", "127.0.0.1", "--port", "0", "--model", str(ray_files["model"]),
            "--served-model-name", MODEL, "--dtype", "float32", "--num-pages", "256", "--kernel-backend", "xla",
            "--api-key", API_KEY]
    for name, d in ray_files["adapters"].items():
        argv += ["--adapter", f"{name}={d}"]
    env = {k: v for k, v in server_env.items() if k != "RAY_ADDRESS"}
    proc = ServerProcess(argv, {**env, "PYTHONPATH": str(ROOT)})
    try:
        port = httpx.URL(proc.url).port
        proxy = printed(proc, r"Serve's HTTP proxy .* on (http://\S+)")
        assert httpx.URL(proxy).port != port
        # The answer on the port comes straight from the ingress replica: no hop through Serve's proxy.
        assert "SloraIngress" in listener(port) and "ProxyActor" not in listener(port), listener(port)
        assert "ProxyActor" in listener(httpx.URL(proxy).port), listener(httpx.URL(proxy).port)
        for model in (MODEL, *ADAPTERS):
            r = complete(proc.url, model, [1, 2, 3], max_tokens=2)
            assert r.status_code == 200, r.text
            replica_of(r)
            assert "replica;dur=" in r.headers["server-timing"], dict(r.headers)
        r = complete(proxy, "a0", [1, 2, 3], max_tokens=2)  # the proxy still routes to the same app
        assert r.status_code == 200, r.text
        with httpx.stream("POST", proc.url + "/v1/completions", timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "a1", "prompt": [4, 5], "max_tokens": 3, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["x-slora-replica"]
            assert [line for line in r.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    finally:
        assert proc.stop() == 0, proc.log()
