"""Loading a checkpoint straight into the fused device layout: bit for bit what the numpy loader and
fuse_params give, layers placed from several threads, and the orbax cache of the result."""

import json
import threading

import jax
import numpy as np
import pytest

from slora_jax.errors import ModelError
from slora_jax.model import device_load as dl
from slora_jax.model import weights_cache as wc
from slora_jax.model.checkpoint import load_params
from slora_jax.model.hf_config import load_model_config
from slora_jax.model.llama import fuse_params
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_checkpoint

CFG = tiny_llama_config(vocab_size=128, num_layers=3)


def assert_fused_equal(got, model_dir, cfg, dtype, scan_layers):
    """``got`` against fuse_params(load_params(...)) (host numpy), bit for bit, with its placement."""
    ref = fuse_params(load_params(model_dir, cfg, dtype), cfg)
    assert set(got) == set(ref)
    assert isinstance(got["layers"], dict if scan_layers else list)
    for k, v in ref.items():
        if k == "layers":
            for name, stacked in v.items():
                leaves = [got["layers"][name]] if scan_layers else [layer[name] for layer in got["layers"]]
                for leaf in leaves:
                    assert isinstance(leaf, jax.Array) and leaf.dtype == stacked.dtype
                arr = np.asarray(leaves[0]) if scan_layers else np.stack([np.asarray(x) for x in leaves])
                assert arr.shape == stacked.shape, name
                assert arr.tobytes() == stacked.tobytes(), name
        else:
            assert isinstance(got[k], jax.Array) and np.asarray(got[k]).tobytes() == v.tobytes(), k


@pytest.mark.parametrize("scan_layers", [True, False])
def test_hf_checkpoints_match_the_numpy_loader(llama_gqa_dir, qwen2_dir, scan_layers):
    # Made by transformers: llama (GQA, untied head) and qwen2 (q/k/v biases, tied embeddings).
    for d in (llama_gqa_dir, qwen2_dir):
        cfg = load_model_config(d)
        got = dl.load_fused_params(d, cfg, "float32", scan_layers=scan_layers, workers=2)
        assert_fused_equal(got, d, cfg, "float32", scan_layers)


@pytest.mark.parametrize("file_dtype,dtype,shards", [("bfloat16", "bfloat16", 1), ("float32", "bfloat16", 3),
                                                     ("bfloat16", "float32", 2)])
def test_casts_and_shards(tmp_path, file_dtype, dtype, shards):
    d = write_random_checkpoint(tmp_path / "m", CFG, seed=1, dtype=file_dtype, shards=shards)
    got = dl.load_fused_params(d, CFG, dtype, scan_layers=True, workers=2)
    assert_fused_equal(got, d, CFG, dtype, True)


def test_layers_are_placed_from_several_threads(tmp_path, monkeypatch):
    cfg = tiny_llama_config(vocab_size=128, num_layers=4)
    d = write_random_checkpoint(tmp_path / "m", cfg, seed=2, dtype="bfloat16")
    barrier = threading.Barrier(2, timeout=30)  # layers go through in pairs, or this times out
    threads = set()
    real = dl._layer_program

    def program(*a):
        inner = real(*a)

        def run(raw):
            threads.add(threading.get_ident())
            barrier.wait()
            return inner(raw)
        return run

    monkeypatch.setattr(dl, "_layer_program", program)
    got = dl.load_fused_params(d, cfg, "bfloat16", scan_layers=False, workers=2)
    assert len(threads) == 2 and threading.get_ident() not in threads
    assert_fused_equal(got, d, cfg, "bfloat16", False)


def test_bad_checkpoints_raise_model_error(tmp_path):
    d = write_random_checkpoint(tmp_path / "m", CFG, seed=3)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(ModelError, match="truncated"):
        dl.load_fused_params(d, CFG, "float32")
    with pytest.raises(ModelError, match="missing tensor"):
        dl.load_fused_params(write_random_checkpoint(tmp_path / "n", CFG), tiny_llama_config(vocab_size=128,
                                                                                             num_layers=4), "float32")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cache_restores_the_fused_layout_without_reading_the_checkpoint(tmp_path, monkeypatch, scan_layers):
    d = write_random_checkpoint(tmp_path / "m", CFG, seed=4, dtype="bfloat16", shards=2)
    cache = tmp_path / "cache"
    first = wc.load_fused_params_cached(d, CFG, "bfloat16", cache, scan_layers=scan_layers)
    assert_fused_equal(first, d, CFG, "bfloat16", scan_layers)

    def refuse(*a, **k):
        raise AssertionError("the checkpoint was loaded although the cache holds it")

    monkeypatch.setattr(dl, "load_fused_params", refuse)
    again = wc.load_fused_params_cached(d, CFG, "bfloat16", cache, scan_layers=scan_layers)
    assert_fused_equal(again, d, CFG, "bfloat16", scan_layers)
    monkeypatch.undo()
    # Another layout is another entry; a damaged entry is loaded again and replaced.
    other = wc.load_fused_params_cached(d, CFG, "bfloat16", cache, scan_layers=not scan_layers)
    assert_fused_equal(other, d, CFG, "bfloat16", not scan_layers)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    entry = next(p for p in cache.iterdir() if ("stacked" if scan_layers else "unrolled") in p.name)
    # The entry is the nnx state of the Llama module, by module path.
    stored = json.loads((entry / "params" / "_METADATA").read_text())["tree_metadata"]
    layer = "'layers', " if scan_layers else "'layers', '0', "
    assert f"({layer}'attn', 'wqkv')" in stored and f"({layer}'mlp', 'w_gate_up')" in stored, list(stored)
    for p in (entry / "params").rglob("*"):
        if p.is_file() and p.stat().st_size > 0 and "manifest" not in p.name:
            p.write_bytes(b"\0" * 3)
    healed = wc.load_fused_params_cached(d, CFG, "bfloat16", cache, scan_layers=scan_layers)
    assert_fused_equal(healed, d, CFG, "bfloat16", scan_layers)
    monkeypatch.setattr(dl, "load_fused_params", refuse)
    assert_fused_equal(wc.load_fused_params_cached(d, CFG, "bfloat16", cache, scan_layers=scan_layers),
                       d, CFG, "bfloat16", scan_layers)
