"""Two engine replicas of a tiny model with four adapters on a local Ray instance, behind Ray Serve's HTTP
proxy on 127.0.0.1; and an in-process engine over the same files, the reference every answer must equal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import slora_jax as sj
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter, write_random_checkpoint
from tests.server.conftest import ServerProcess, server_env  # noqa: F401 (a fixture)
from tests.server.support import ENGINE_CONFIG, write_byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
API_KEY = "ray-key"
ADAPTERS = {"a0": 4, "a1": 8, "a2": 4, "a3": 8}  # name -> rank, all on q/v/gate: loaded at start
LATE = "late"  # under the adapter root, loaded at runtime by the tests
REPLICAS = 2


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


# Ray, its app and the reference engine live for one test module, not the session: Ray's processes and this
# process's Ray threads would otherwise stay busy through every later test of the suite.
@pytest.fixture(scope="module")
def ray_reference(ray_files):
    """One engine over the same checkpoint and adapters, in this process."""
    eng = sj.Engine.from_pretrained(ray_files["model"], config=sj.EngineConfig(**ENGINE_CONFIG))
    for name, d in ray_files["adapters"].items():
        eng.load_adapter(name, d)
    eng.load_adapter(LATE, ray_files["late"])
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance; the app joins it (--ray-address) and the tests inspect it from here."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_app(ray_cluster, ray_files, server_env):
    """``slora-jax serve --replicas 2`` joined to the test's Ray instance, on a free port; yields its URL.
    This process keeps its own connection to the instance, to look at replicas and kill them."""
    import ray

    argv = [sys.executable, "-m", "slora_jax", "serve", "--replicas", str(REPLICAS),
            "--ray-address", ray.get_runtime_context().gcs_address, "--replica-cpus", "0.5",
            "--max-ongoing-requests", "64", "--host", "127.0.0.1", "--port", "0",
            "--model", str(ray_files["model"]), "--served-model-name", MODEL, "--dtype", "float32",
            "--num-pages", "512", "--kernel-backend", "xla", "--api-key", API_KEY,
            "--adapter-root", str(ray_files["adapter_root"]),
            "--no-load-adapters-on-request"]  # an unloaded adapter stays unloaded until loaded again
    for name, d in ray_files["adapters"].items():
        argv += ["--adapter", f"{name}={d}"]
    proc = ServerProcess(argv, {**server_env, "PYTHONPATH": str(ROOT)})
    yield proc.url
    assert proc.stop() == 0, proc.log()
