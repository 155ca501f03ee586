"""Real server processes on 127.0.0.1 (random ports) over a tiny random checkpoint with a byte-level tokenizer,
and an in-process engine over the same files as the reference for every answer the servers give."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import slora_jax as sj
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter, write_random_checkpoint
from tests.server.support import (API_KEY, follow_output, ENGINE_CONFIG, LATE_ADAPTER, LIMITED, MODEL, START_ADAPTERS,
                                  STARTUP_TIMEOUT_S, write_byte_tokenizer)


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Checkpoint, adapters (inside and outside the adapter root) and escape attempts (symlinks)."""
    root = tmp_path_factory.mktemp("srv")
    cfg = tiny_llama_config()
    model = write_random_checkpoint(root / "tiny", cfg, seed=1, std=0.08)
    write_byte_tokenizer(model)
    adapter_root = root / "adapter_root"
    adapters = {name: write_random_adapter(adapter_root / name, cfg, rank=r, alpha=2 * r, target_modules=t,
                                           seed=10 + i, init_scale=0.3)
                for i, (name, (r, t)) in enumerate(START_ADAPTERS.items())}
    name, r, t = LATE_ADAPTER
    late = write_random_adapter(adapter_root / "nested" / name, cfg, rank=r, alpha=2 * r, target_modules=t,
                                seed=42, init_scale=0.3)
    outside = write_random_adapter(root / "outside", cfg, rank=4, seed=7, init_scale=0.3)
    (adapter_root / "link_out").symlink_to(outside, target_is_directory=True)
    # A folder inside the root whose weights file links to a file outside it.
    sneaky = adapter_root / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    return dict(model=model, adapter_root=adapter_root, adapters=adapters, late=late, outside=outside, root=root)


@pytest.fixture(scope="session")
def reference(files):
    """The in-process engine over the same checkpoint and adapters: what every server answer must equal."""
    eng = sj.Engine.from_pretrained(files["model"], config=sj.EngineConfig(**ENGINE_CONFIG))
    for name, d in files["adapters"].items():
        eng.load_adapter(name, d)
    eng.load_adapter(LATE_ADAPTER[0], files["late"])
    return eng


class ServerProcess:
    """A server subprocess: its URL, its output (drained on a thread so the pipe never fills)."""

    def __init__(self, argv: list[str], env=None):
        self.lines: collections.deque = collections.deque(maxlen=2000)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=str(Path(__file__).resolve().parents[2]))
        self.url = None
        found = follow_output(self)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + self.log())
        while time.monotonic() < deadline:  # bound before listening: wait for /health
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server never became healthy:\n" + self.log())

    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="session")
def server_env(tmp_path_factory):
    """Server processes share a persistent compilation cache: the second one compiles little."""
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return env


@pytest.fixture(scope="session")
def server(files, server_env):
    """The main server, started through the real CLI: API key, adapter root, three adapters at start."""
    argv = [sys.executable, "-m", "slora_jax", "serve", "--model", str(files["model"]), "--host", "127.0.0.1",
            "--port", "0", "--dtype", "float32", "--num-pages", "512", "--kernel-backend", "xla",
            "--served-model-name", MODEL, "--api-key", API_KEY, "--adapter-root", str(files["adapter_root"])]
    for name, d in files["adapters"].items():
        argv += ["--adapter", f"{name}={d}"]
    proc = ServerProcess(argv, server_env)
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="session")
def limited_server(files, server_env):
    """A second server through ``run_server`` with tight limits: no API key, no adapter root, small bounds."""
    args = dict(model=str(files["model"]), adapter=[f"a0={files['adapters']['a0']}"], adapter_root=None,
                host="127.0.0.1", port=0, api_key=None, dtype="float32", tensor_parallel=1, kernel_backend="xla",
                num_pages=512, max_batch_size=64, max_lora_rank=64, served_model_name=None, **LIMITED)
    code = ("import argparse, json, sys; from slora_jax.server.app import run_server; "
            "sys.exit(run_server(argparse.Namespace(**json.loads(sys.argv[1]))))")
    proc = ServerProcess([sys.executable, "-c", code, json.dumps(args)], server_env)
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
