"""Named model shapes for the benchmarks, whole or as their first layers."""

import pytest

from slora_jax.bench.setup import resolve_model
from slora_jax.errors import ConfigError


def test_a_named_shape_keeps_its_first_layers():
    whole, _ = resolve_model("llama-3-70b")
    part, folder = resolve_model("llama-3-70b:layers=2")
    assert folder is None and whole.num_layers == 80 and part.num_layers == 2
    assert (part.hidden_size, part.intermediate_size, part.num_heads, part.num_kv_heads, part.vocab_size) == \
        (whole.hidden_size, whole.intermediate_size, whole.num_heads, whole.num_kv_heads, whole.vocab_size) == \
        (8192, 28672, 64, 8, 128256)


@pytest.mark.parametrize("spec", ["llama-3-70b:layers=0", "llama-3-70b:layers=81", "llama-3-8b:layers=x"])
def test_a_layer_count_outside_the_shape_is_refused(spec):
    with pytest.raises(ConfigError, match="layers must be an integer from 1 to"):
        resolve_model(spec)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="llama-3-70b"):
        resolve_model("llama-4-1t")


def test_a_dry_run_can_shrink_the_vocabulary():
    cfg, _ = resolve_model("llama-3-70b:layers=2,vocab=32000")
    assert (cfg.num_layers, cfg.vocab_size, cfg.hidden_size) == (2, 32000, 8192)
    assert cfg.eos_token_ids == () and cfg.bos_token_id is None  # 128000 and 128001 lie past 32000


@pytest.mark.parametrize("spec", ["llama-3-70b:vocab=0", "llama-3-70b:vocab=3", "llama-3-70b:hidden=64",
                                  "llama-3-70b:layers=2,vocab=x", "llama-3-70b:", "llama-3-70b:layers=2,layers=3"])
def test_other_settings_are_refused(spec):
    with pytest.raises(ConfigError, match="cannot be set|must be an integer|given twice"):
        resolve_model(spec)
