"""The orbax weights cache: a restored pytree equals a fresh safetensors conversion bit for bit, and a
changed checkpoint is never served from a stale entry."""

import os
import shutil

import numpy as np
import pytest

from slora_jax.errors import ModelError
from slora_jax.model import weights_cache as wc
from slora_jax.model.checkpoint import load_params
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_checkpoint

CFG = tiny_llama_config(vocab_size=128, num_layers=2)


def flat(tree):
    out = {k: v for k, v in tree.items() if k != "layers"}
    out.update({f"layers/{k}": v for k, v in tree["layers"].items()})
    return out


def assert_same(got, ref):
    got, ref = flat(got), flat(ref)
    assert set(got) == set(ref)
    for k in ref:
        assert isinstance(got[k], np.ndarray), k
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        # Bitwise, whatever the dtype (bfloat16 included).
        assert got[k].tobytes() == ref[k].tobytes(), k


@pytest.fixture()
def ckpt(tmp_path):
    return write_random_checkpoint(tmp_path / "model", CFG, seed=0, dtype="float32", shards=2)


def _no_conversion(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("converted from safetensors although a valid cache entry exists")
    monkeypatch.setattr(wc, "load_params", refuse)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip_restores_exactly_what_conversion_gives(ckpt, tmp_path, monkeypatch, dtype):
    cache = tmp_path / "cache"
    ref = load_params(ckpt, CFG, dtype)
    assert not wc.is_cached(ckpt, CFG, dtype, cache)
    assert_same(wc.load_params_cached(ckpt, CFG, dtype, cache), ref)  # miss: converts and saves
    assert wc.is_cached(ckpt, CFG, dtype, cache)
    _no_conversion(monkeypatch)
    assert_same(wc.load_params_cached(ckpt, CFG, dtype, cache), ref)  # hit: restored by orbax


def test_dtypes_get_separate_entries(ckpt, tmp_path):
    cache = tmp_path / "cache"
    wc.load_params_cached(ckpt, CFG, "bfloat16", cache)
    wc.load_params_cached(ckpt, CFG, "float32", cache)
    assert len(os.listdir(cache)) == 2
    assert wc.is_cached(ckpt, CFG, "bfloat16", cache) and wc.is_cached(ckpt, CFG, "float32", cache)


def test_rewritten_checkpoint_is_not_served_from_the_stale_entry(ckpt, tmp_path):
    cache = tmp_path / "cache"
    old_entry = wc.cache_entry(ckpt, CFG, "float32", cache)
    wc.load_params_cached(ckpt, CFG, "float32", cache)
    write_random_checkpoint(ckpt, CFG, seed=1, dtype="float32", shards=2)  # same names and shapes
    assert not wc.is_cached(ckpt, CFG, "float32", cache)
    new = load_params(ckpt, CFG, "float32")
    assert_same(wc.load_params_cached(ckpt, CFG, "float32", cache), new)
    assert not old_entry.exists()  # the stale entry is gone, the new one serves
    assert os.listdir(cache) == [wc.cache_entry(ckpt, CFG, "float32", cache).name]


def test_content_change_with_same_size_and_mtime_is_detected(ckpt, tmp_path):
    cache = tmp_path / "cache"
    wc.load_params_cached(ckpt, CFG, "float32", cache)
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    st = shard.stat()
    keep = ckpt / "keep"
    keep.mkdir()
    write_random_checkpoint(keep, CFG, seed=5, dtype="float32", shards=2)
    shutil.copyfile(keep / shard.name, shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    assert not wc.is_cached(ckpt, CFG, "float32", cache)
    assert_same(wc.load_params_cached(ckpt, CFG, "float32", cache), load_params(ckpt, CFG, "float32"))


def test_model_config_is_part_of_the_key(ckpt, tmp_path):
    cache = tmp_path / "cache"
    wc.load_params_cached(ckpt, CFG, "float32", cache)
    other = tiny_llama_config(vocab_size=128, num_layers=2, rms_norm_eps=1e-5)
    assert not wc.is_cached(ckpt, other, "float32", cache)


def test_damaged_entry_is_converted_again(ckpt, tmp_path):
    cache = tmp_path / "cache"
    ref = load_params(ckpt, CFG, "float32")
    wc.load_params_cached(ckpt, CFG, "float32", cache)
    entry = wc.cache_entry(ckpt, CFG, "float32", cache)
    for root, _, files in os.walk(entry / "params"):
        for f in files:
            if f not in ("_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt"):
                path = os.path.join(root, f)
                with open(path, "r+b") as fh:
                    fh.truncate(max(0, os.path.getsize(path) // 3))
    assert_same(wc.load_params_cached(ckpt, CFG, "float32", cache), ref)
    assert wc.is_cached(ckpt, CFG, "float32", cache)


def test_interrupted_save_is_not_a_valid_entry(ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    wc.load_params_cached(ckpt, CFG, "float32", cache)
    (wc.cache_entry(ckpt, CFG, "float32", cache) / wc.MANIFEST).unlink()  # as if killed before the manifest
    assert not wc.is_cached(ckpt, CFG, "float32", cache)
    assert_same(wc.load_params_cached(ckpt, CFG, "float32", cache), load_params(ckpt, CFG, "float32"))
    assert wc.is_cached(ckpt, CFG, "float32", cache)


def test_unwritable_cache_still_loads(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_same(wc.load_params_cached(ckpt, CFG, "float32", blocker / "cache"), load_params(ckpt, CFG, "float32"))


def test_bad_inputs_raise_model_error(ckpt, tmp_path):
    with pytest.raises(ModelError, match="dtype"):
        wc.load_params_cached(ckpt, CFG, "int8", tmp_path / "cache")
    with pytest.raises(ModelError, match="does not exist"):
        wc.load_params_cached(tmp_path / "nowhere", CFG, "float32", tmp_path / "cache")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ModelError, match="truncated"):
        wc.load_params_cached(bad, CFG, "float32", tmp_path / "cache")
