"""Two engine replicas of a tiny model with four adapters on a local Ray instance, behind Ray Serve's HTTP
proxy on 127.0.0.1; and an in-process engine over the same files, the reference every answer must equal."""

from __future__ import annotations

import argparse
import functools
import os
import socket
from pathlib import Path

import pytest

import slora_jax as sj
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter, write_random_checkpoint
from tests.server.support import ENGINE_CONFIG, write_byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
API_KEY = "ray-key"
ADAPTERS = {"a0": 4, "a1": 8, "a2": 4, "a3": 8}  # name -> rank, all on q/v/gate: loaded at start
LATE = "late"  # under the adapter root, loaded at runtime by the tests
REPLICAS = 2


def serve_args(argv: list[str]) -> argparse.Namespace:
    """The namespace `slora-jax serve ARGV` parses to."""
    from slora_jax.cli import _serve_args

    parser = argparse.ArgumentParser()
    _serve_args(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    cfg = tiny_llama_config()
    model = write_random_checkpoint(root / MODEL, cfg, seed=3, std=0.08)
    write_byte_tokenizer(model)
    adapter_root = root / "adapters"
    adapters = {name: write_random_adapter(adapter_root / name, cfg, rank=r, alpha=2 * r, seed=20 + i,
                                           target_modules=("q_proj", "v_proj", "gate_proj"), init_scale=0.3)
                for i, (name, r) in enumerate(ADAPTERS.items())}
    late = write_random_adapter(adapter_root / LATE, cfg, rank=8, alpha=16, seed=40, init_scale=0.3)
    return dict(model=model, adapter_root=adapter_root, adapters=adapters, late=late, root=root)


@pytest.fixture(scope="session")
def ray_reference(ray_files):
    """One engine over the same checkpoint and adapters, in this process."""
    eng = sj.Engine.from_pretrained(ray_files["model"], config=sj.EngineConfig(**ENGINE_CONFIG))
    for name, d in ray_files["adapters"].items():
        eng.load_adapter(name, d)
    eng.load_adapter(LATE, ray_files["late"])
    return eng


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray instance whose workers import this checkout and run JAX on the CPU."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    from ray import serve

    cache = tmp_path_factory.mktemp("jax_cache")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_app(ray_cluster, ray_files):
    """The app on two replicas (fixed count) behind the proxy; yields its URL."""
    from ray import serve

    from slora_jax.deploy.ray import APP_NAME, ReplicaOptions, build_app, wait_ready
    from slora_jax.server.app import ServeSetup

    port = free_port()
    argv = ["--model", str(ray_files["model"]), "--served-model-name", MODEL, "--dtype", "float32",
            "--num-pages", "512", "--kernel-backend", "xla", "--api-key", API_KEY,
            "--adapter-root", str(ray_files["adapter_root"]),
            "--no-load-adapters-on-request"]  # an unloaded adapter stays unloaded until loaded again
    for name, d in ray_files["adapters"].items():
        argv += ["--adapter", f"{name}={d}"]
    args = serve_args(argv)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = ReplicaOptions(replicas=REPLICAS, num_cpus=0.5, max_ongoing_requests=64, health_check_period_s=1.0)
    serve.run(build_app(functools.partial(ServeSetup, args), options), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout_s=240)
    yield url
    serve.delete(APP_NAME)
