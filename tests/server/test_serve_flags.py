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
    # float32 on a CPU, bfloat16 on a GPU, as the engine's own default.
    assert cfg.dtype == default.dtype == "auto"
    assert cfg.resolved_dtype("cpu") == "float32" and cfg.resolved_dtype("gpu") == "bfloat16"


def test_a_bad_memory_fraction_is_refused_by_name(monkeypatch):
    with pytest.raises(sj.ConfigError, match="memory_fraction"):
        engine_config(serve_args(monkeypatch, "--memory-fraction", "1.5"))


def test_vllm_adapter_flags_and_seed_reach_the_engine_config(monkeypatch):
    cfg = engine_config(serve_args(monkeypatch, "--max-loras", "3", "--seed", "7"))
    assert (cfg.max_adapters_on_device, cfg.seed) == (3, 7)


def test_pin_host_cache_flag_reaches_the_engine_config(monkeypatch):
    assert engine_config(serve_args(monkeypatch, "--no-pin-host-cache")).pin_host_cache is False
    assert engine_config(serve_args(monkeypatch, "--pin-host-cache")).pin_host_cache is True
    assert engine_config(serve_args(monkeypatch)).pin_host_cache is sj.EngineConfig().pin_host_cache


def test_max_cpu_loras_keeps_that_many_adapters_in_host_memory(monkeypatch, files, tmp_path):
    """Adapters of the largest accepted shape: two stay in host memory, a third evicts the oldest."""
    from slora_jax.model.hf_config import load_model_config
    from slora_jax.model.random_checkpoint import write_random_adapter

    args = serve_args(monkeypatch, "--max-cpu-loras", "2", "--max-lora-rank", "16", "--dtype", "float32",
                      "--num-pages", "256", "--kernel-backend", "xla")
    args.model = str(files["model"])
    engine = sj.Engine.from_pretrained(files["model"], config=engine_config(args))
    mcfg = load_model_config(files["model"])
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for i in range(3):
        engine.load_adapter(f"big{i}", write_random_adapter(tmp_path / f"big{i}", mcfg, rank=16, seed=i,
                                                            target_modules=targets))
        assert engine.stats()["adapter_host_evictions"] == max(0, i - 1)
    assert engine.stats()["adapter_host_bytes"] <= engine.config.host_cache_bytes
