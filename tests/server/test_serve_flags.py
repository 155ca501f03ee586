"""`slora-jax serve` flags reach the EngineConfig; the ones left out keep its defaults."""

import pytest

import slora_jax as sj
from slora_jax.cli import main as cli_main
from slora_jax.server.app import engine_config


def serve_args(monkeypatch, *flags):
    """The namespace `slora-jax serve ...` would hand to run_server (which is replaced to catch it)."""
    seen = {}
    monkeypatch.setattr("slora_jax.server.app.run_server", lambda args: seen.setdefault("args", args) and 0)
    cli_main(["serve", "--model", "m", *flags])
    return seen["args"]


def test_memory_and_prefill_flags_reach_the_engine_config(monkeypatch):
    cfg = engine_config(serve_args(monkeypatch, "--memory-fraction", "0.6", "--max-prefill-tokens", "1024",
                                   "--max-batch-size", "32", "--dtype", "float32"))
    assert (cfg.memory_fraction, cfg.max_prefill_tokens, cfg.max_batch_size, cfg.dtype) == (0.6, 1024, 32, "float32")


def test_flags_left_out_keep_the_defaults(monkeypatch):
    cfg, default = engine_config(serve_args(monkeypatch)), sj.EngineConfig()
    assert (cfg.memory_fraction, cfg.max_prefill_tokens) == (default.memory_fraction, default.max_prefill_tokens)


def test_a_bad_memory_fraction_is_refused_by_name(monkeypatch):
    with pytest.raises(sj.ConfigError, match="memory_fraction"):
        engine_config(serve_args(monkeypatch, "--memory-fraction", "1.5"))
