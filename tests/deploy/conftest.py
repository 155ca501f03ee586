"""Two engine replicas of a tiny model with four adapters on a Ray instance that ``serve`` starts, answering on
127.0.0.1; a local Ray instance of the test process's own (test_fleet.py); and an in-process engine over the
same files, the reference every answer must equal."""

from __future__ import annotations

import re
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
    """A local Ray instance of this process's own, where test_fleet.py builds deployments."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_serve(ray_files, server_env):
    """``slora-jax serve --replicas 2`` on a free port, starting its own Ray instance as a user's command does
    (in the default mode: Serve's HTTP proxy on that port); yields the server process."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    argv = [sys.executable, "-m", "slora_jax", "serve", "--replicas", str(REPLICAS), "--replica-cpus", "0.5",
            "--max-ongoing-requests", "64", "--host", "127.0.0.1", "--port", "0",
            "--model", str(ray_files["model"]), "--served-model-name", MODEL, "--dtype", "float32",
            "--num-pages", "512", "--kernel-backend", "xla", "--api-key", API_KEY,
            "--adapter-root", str(ray_files["adapter_root"]),
            "--no-load-adapters-on-request"]  # an unloaded adapter stays unloaded until loaded again
    for name, d in ray_files["adapters"].items():
        argv += ["--adapter", f"{name}={d}"]
    env = {k: v for k, v in server_env.items() if k != "RAY_ADDRESS"}  # its own instance, not a cluster's
    proc = ServerProcess(argv, {**env, "PYTHONPATH": str(ROOT)})
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def ray_app(ray_serve):
    """The app's URL: the port given to ``serve``."""
    return ray_serve.url


@pytest.fixture(scope="module")
def ray_app_cluster(ray_serve):
    """This process connected to the app's Ray instance, to look at replicas and kill them; disconnected
    before the app stops (fixtures end in reverse order)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    address = printed(ray_serve, r"started a local Ray instance at (\S+)")
    # A Ray instance that a command starts on this machine asks for the token in ~/.ray/auth_token. A driver
    # sends it when it found the instance on its own (ray.init()), not when given the address, unless
    # RAY_AUTH_MODE was set before Ray was imported: the switch ray.init() turns on for a found instance.
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def printed(server: ServerProcess, pattern: str) -> str:
    """The first group of ``pattern`` in a line the server printed."""
    for line in list(server.lines):
        m = re.search(pattern, line)
        if m:
            return m.group(1)
    raise AssertionError(f"no line matches {pattern!r}:\n" + server.log())


def listener(port: int) -> str:
    """The command line of the process listening on ``port`` here (Ray names its workers by what they run)."""
    psutil = pytest.importorskip("psutil")
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return " ".join(psutil.Process(conn.pid).cmdline())
    raise AssertionError(f"nothing listens on port {port}")
