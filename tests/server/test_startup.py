"""`slora-jax serve` refuses bad paths, flags and a busy port in one line, before the model loads."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slora_jax.cli import main as cli_main
from slora_jax.server.startup import parse_adapter_specs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broken_model(files, tmp_path_factory):
    """A valid config.json beside weights that cannot load: any error about these comes from loading."""
    d = tmp_path_factory.mktemp("broken") / "model"
    d.mkdir()
    (d / "config.json").write_text((files["model"] / "config.json").read_text())
    (d / "model.safetensors").write_bytes(b"not safetensors")
    return d


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def startup_error(*argv) -> str:
    """The message `slora-jax serve ARGV` stops with (it must stop before loading anything)."""
    with pytest.raises(SystemExit) as info:
        cli_main(["serve", *argv])
    message = str(info.value)
    assert message.startswith("slora-jax serve: error: ") and "\n" not in message, message
    return message


def test_bad_paths_are_named(files, broken_model, tmp_path):
    assert "no such folder" in startup_error("--model", str(tmp_path / "nope"))
    assert "no config.json" in startup_error("--model", str(tmp_path))
    m = str(broken_model)
    assert "--adapter-root" in startup_error("--model", m, "--adapter-root", str(tmp_path / "nope"))
    msg = startup_error("--model", m, "--adapter", f"x={tmp_path}")
    assert "'x'" in msg and "adapter_config.json" in msg
    assert "--tokenizer" in startup_error("--model", m, "--tokenizer", str(tmp_path))
    assert "--chat-template" in startup_error("--model", m, "--chat-template", str(tmp_path / "t.jinja"))
    assert "--max-cpu-loras" in startup_error("--model", m, "--max-loras", "8", "--max-cpu-loras", "4")
    assert "JSON" in startup_error("--model", m, "--lora-modules", '{"name": "x"')
    assert "twice" in startup_error("--model", m, "--adapter", f"x={files['adapters']['a0']}",
                                    "--lora-modules", f"x={files['adapters']['a1']}")


def test_several_processes_flags_are_checked(broken_model, tmp_path):
    m = str(broken_model)
    job = ("--coordinator-address", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0")
    assert "--num-processes, --process-id missing" in startup_error("--model", m, *job[:2])
    assert "--coordinator-address must be host:port" in startup_error("--model", m, "--coordinator-address", "h",
                                                                      *job[2:])
    assert "--process-id must be an integer in [0, 2)" in startup_error("--model", m, *job[:4], "--process-id", "2")
    # Runtime adapter loads would reach process 0 only.
    msg = startup_error("--model", m, *job, "--adapter-root", str(tmp_path))
    assert "--adapter-root" in msg and "at start" in msg
    with pytest.raises(SystemExit) as info:  # Ray's replicas are separate engines
        cli_main(["serve", "--model", m, *job, "--replicas", "2"])
    assert info.value.code == 2


def test_a_busy_port_fails_before_the_model_loads(broken_model, busy_port):
    # The weights are corrupt: had it loaded them first, the error would be about them.
    msg = startup_error("--model", str(broken_model), "--port", str(busy_port))
    assert f"127.0.0.1:{busy_port}" in msg and "in use" in msg


def test_the_error_is_one_line_on_stderr(broken_model, busy_port, server_env):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "slora_jax", "serve", "--model", str(broken_model), "--port",
                           str(busy_port)], capture_output=True, text=True, cwd=REPO, env=server_env, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"slora-jax serve: error: cannot listen on 127.0.0.1:{busy_port}: already in use "
                     f"(choose another --port)"], proc.stderr
    assert time.monotonic() - t0 < 60


def test_lora_modules_forms():
    specs = parse_adapter_specs(["a=/x"], ["b=/y", json.dumps({"name": "c", "path": "/z", "base_model_name": "m"})])
    assert specs == [("a", "/x"), ("b", "/y"), ("c", "/z")]
