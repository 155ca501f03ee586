"""The README's server examples, run as written against `slora-jax serve` on the demo model.

The blocks are read from README.md: the first shell block (demo, key, serve) runs in bash with HOME in a
temporary folder; every curl command of the second runs as it stands; the Python block runs in a fresh
interpreter. Only the port changes (the server takes a free one, and the examples' 8000 is rewritten to it),
so parallel test runs never collide.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
SECTION = "## OpenAI-compatible server"


def server_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README's server section, in order."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    return re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory):
    """Runs the README's first block; yields (port, environment with KEY) while its server runs."""
    blocks = server_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "bash", "python"], blocks
    home = tmp_path_factory.mktemp("home")
    port, log, pidfile = free_port(), home / "serve.log", home / "serve.pid"
    env = dict(os.environ, HOME=str(home), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    # `pip install` is this test run's own; `slora-jax` is this checkout's (python -m slora_jax), and serve
    # gets the free port after the README's flags (argparse keeps the last).
    shims = f"""
pip() {{ echo "(pip $* : already installed)"; }}
slora-jax() {{
  if [ "$1" = serve ]; then
    echo $BASHPID > {shlex.quote(str(pidfile))}
    exec {shlex.quote(sys.executable)} -m slora_jax "$@" --port {port} > {shlex.quote(str(log))} 2>&1
  fi
  {shlex.quote(sys.executable)} -m slora_jax "$@"
}}
set -e
"""
    setup = subprocess.run(["bash", "-c", shims + blocks[0][1] + '\necho "KEY=$KEY"'], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    key = re.search(r"^KEY=(.*)$", setup.stdout, re.M).group(1)
    assert key, "the README's block sets KEY"
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and pidfile.exists(), log.read_text() if log.exists() else "no log"
        time.sleep(0.5)
    yield port, dict(env, KEY=key)
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    for _ in range(300):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)


def on_port(code: str, port: int) -> str:
    return code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")


@pytest.mark.slow
def test_readme_curl_examples(readme_server):
    port, env = readme_server
    commands = shell_commands(server_blocks()[1][1])
    assert len(commands) >= 6 and all(c.startswith("curl ") for c in commands), commands
    for command in commands:
        out = subprocess.run(["bash", "-c", on_port(command, port)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, (command, out.stderr)
        if " -N " in command:  # a stream: events, then [DONE], no error event
            events = [line[len("data: "):] for line in out.stdout.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", out.stdout
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks and all("error" not in c for c in chunks), out.stdout
            assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks), out.stdout
        else:
            body = json.loads(out.stdout)
            assert "error" not in body, (command, body)
    # What the examples did: the completion and chat answered with text, the tokenizer routes round-trip.
    first = json.loads(subprocess.run(["bash", "-c", on_port(commands[0], port)], env=env, capture_output=True,
                                      text=True).stdout)
    assert first["choices"][0]["text"] and first["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_readme_python_example(readme_server):
    port, env = readme_server
    code = on_port(server_blocks()[2][1], port)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "the example prints the completions"
    # The adapter it named by folder was loaded on that request.
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {env['KEY']}"})
    assert "summarizer" in {m["id"] for m in models.json()["data"]}


def test_ray_section_commands_parse():
    """Every `slora-jax serve` line of the Ray Serve section is a command the CLI accepts."""
    import argparse

    from slora_jax.cli import _serve_args

    text = (REPO / "README.md").read_text()
    start = text.index("## Many replicas on Ray Serve")
    section = text[start:text.index("\n## ", start + 3)]
    commands = [c for lang, code in re.findall(r"```(bash)\n(.*?)```", section, re.S) for c in shell_commands(code)
                if c.startswith("slora-jax serve")]
    assert len(commands) == 2, commands
    parser = argparse.ArgumentParser()
    _serve_args(parser.add_subparsers())
    for command in commands:
        words = shlex.split(command.split("  #")[0].replace("$D", "/d").replace('"$KEY"', "k"))
        args = parser.parse_args(words[1:])
        assert args.replicas >= 2, command
