"""Tensor parallelism on simulated CPU devices: the sharded engine computes what the single-device one does."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

import jax
from sharding import logical_spec, make_mesh

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import sys, numpy as np, jax
    import slora_jax as sj
    from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter, write_random_checkpoint
    assert len(jax.devices()) == 2, jax.devices()
    root = sys.argv[1]
    cfg = tiny_llama_config()
    model = write_random_checkpoint(root + "/m", cfg, seed=3, std=0.08)
    ad = {"a": write_random_adapter(root + "/a", cfg, rank=8, target_modules=("q_proj", "v_proj", "down_proj"),
                                    seed=1, init_scale=0.3),
          "b": write_random_adapter(root + "/b", cfg, rank=16, target_modules=("k_proj", "o_proj", "gate_proj"),
                                    seed=2, init_scale=0.3)}
    prompts = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12], [7, 7, 7]]
    names = ["a", None, "b"]
    res = {}
    for tp in (1, 2):
        eng = sj.Engine.from_pretrained(model, config=sj.EngineConfig(
            dtype="float32", num_pages=128, tensor_parallel=tp, max_batch_size=4, max_prefill_tokens=32,
            max_model_len=64))
        for n, d in ad.items():
            eng.load_adapter(n, d)
        if tp == 2:
            spec = eng.runner.pool.sharding.spec
            assert tuple(spec) == (None, None, None, "model"), spec
            wq = eng.runner.params["layers"]["wqkv"].sharding.spec
            assert tuple(wq) == (None, None, "model"), wq
        # Programs compiled ahead run with the mesh's shardings too: generate compiles nothing more.
        compiled = len(eng.precompile(sampling=False))
        assert compiled == len(eng.step_shapes()) * len(eng.lora_variants()) == eng.stats()["compiled_shapes"]
        outs = eng.generate(prompts, adapters=names, sampling=sj.SamplingParams(max_tokens=6, ignore_eos=True))
        assert eng.stats()["compiled_shapes"] == compiled
        res[tp] = ([o.token_ids for o in outs], eng.logits(prompts, adapters=names))
        assert eng.stats()["kv_pages"] == 0
    try:
        sj.Engine.from_pretrained(model, config=sj.EngineConfig(tensor_parallel=2, kernel_backend="pallas"))
        raise AssertionError("pallas with tensor_parallel=2 was accepted")
    except sj.ConfigError as e:
        assert "pallas" in str(e)
    assert res[1][0] == res[2][0], res
    for a, b in zip(res[1][1], res[2][1]):
        err = float(np.linalg.norm(a - b) / np.linalg.norm(a))
        assert err < 1e-5, err
    print("ok tensor parallel", res[2][0])
''')


def test_engine_tensor_parallel_2_equals_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "ok tensor parallel" in proc.stdout


def test_logical_spec_splits_only_what_divides():
    mesh = make_mesh(1)
    assert logical_spec((None, "heads"), (64, 96), mesh) == P(None, "model")
    assert logical_spec(("vocab",), (7,), mesh) == P("model")  # a size-1 axis divides everything
    with pytest.raises(ValueError):
        logical_spec((None,), (3, 4), mesh)
    with pytest.raises(ValueError):
        make_mesh(len(jax.devices()) + 1)


def test_more_tensor_parallel_than_devices_is_refused():
    import slora_jax as sj
    from slora_jax.model.init import random_params
    from slora_jax.model.random_checkpoint import tiny_llama_config

    cfg = tiny_llama_config()
    with pytest.raises(sj.ConfigError, match="device"):
        sj.Engine(cfg, random_params(cfg), sj.EngineConfig(tensor_parallel=len(jax.devices()) + 1))
