"""--state-file on its own: written atomically, read back, refused clearly when it is not one of ours."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slora_jax.server.adapter_admin import StateFile


def test_round_trip_and_atomic_replace(tmp_path):
    sf = StateFile(tmp_path / "deeper" / "state.json")
    assert sf.read() == []  # not written yet: nothing to replay
    sf.write([("a", "x/a"), ("b", "b")])
    assert sf.read() == [("a", "x/a"), ("b", "b")]
    sf.write([("b", "b")])
    assert sf.read() == [("b", "b")]
    assert sorted(p.name for p in sf.path.parent.iterdir()) == ["state.json"]  # no temporary file left


@pytest.mark.parametrize("text, message", [
    ("[", "is not a state file this server wrote"),
    ('{"adapters": [{"name": "a"}]}', "is not a state file this server wrote"),
    ('{"version": 99, "adapters": []}', "has version 99"),
])
def test_unusable_files_are_refused_by_name(tmp_path, text, message):
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        StateFile(path).read()


def test_serve_refuses_an_unusable_state_file_before_loading(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 99, "adapters": []}))
    root = tmp_path / "root"
    root.mkdir()
    proc = subprocess.run([sys.executable, "-m", "slora_jax", "serve", "--model", str(tmp_path / "no-model"),
                           "--adapter-root", str(root), "--state-file", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "has version 99" in proc.stderr, proc.stderr
    assert "loading the model" not in proc.stdout
