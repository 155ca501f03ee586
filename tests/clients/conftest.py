"""A real `slora-jax serve` process on the demo model (its tokenizer and chat template, its adapters), for the
clients people point at OpenAI-compatible servers, and the in-process engine over the same files as the
reference for what they report."""

from __future__ import annotations

import os
import sys

import pytest

import slora_jax as sj
from slora_jax.demo import prepare
from tests.server.conftest import ServerProcess

API_KEY = "clients-key"
ADAPTER = "poet"  # the demo adapter the clients are pointed at (every projection, rsLoRA)
ENGINE = dict(dtype="float32", num_pages=2048, kernel_backend="xla")


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory):
    model_dir, adapters = prepare(tmp_path_factory.mktemp("demo"))
    return model_dir, adapters


@pytest.fixture(scope="session")
def client_env(tmp_path_factory):
    """No network: Hugging Face libraries read only local files, caches in a temporary folder."""
    home = tmp_path_factory.mktemp("hf")
    return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                HF_HOME=str(home), TRANSFORMERS_OFFLINE="1")


@pytest.fixture(scope="session")
def demo_server(demo_files, client_env):
    model_dir, adapters = demo_files
    argv = [sys.executable, "-m", "slora_jax", "serve", "--model", str(model_dir), "--port", "0",
            "--api-key", API_KEY, "--adapter", f"{ADAPTER}={adapters[ADAPTER]}",
            "--adapter-root", str(adapters[ADAPTER].parent)]
    for k, v in ENGINE.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    proc = ServerProcess(argv, client_env)
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="session")
def demo_reference(demo_files):
    model_dir, adapters = demo_files
    eng = sj.Engine.from_pretrained(model_dir, config=sj.EngineConfig(**ENGINE))
    eng.load_adapter(ADAPTER, adapters[ADAPTER])
    return eng
