"""One engine over two processes (jax.distributed on CPU, one device each): tensor_parallel=2 across them
serves the tokens a single-process engine serves, whether both processes submit the requests or process 0
does and the other follows; `slora-jax serve` over two processes does too (slow)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import slora_jax as sj
from slora_jax.engine.multihost import SharedInbox
from slora_jax.engine.request import Request
from slora_jax.model.random_checkpoint import tiny_llama_config, write_random_adapter, write_random_checkpoint
from slora_jax.types import RequestMetrics, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12], [7, 7, 7]]
ADAPTERS = ["a", None, "a"]
MAX_TOKENS = 4
SMALL = dict(dtype="float32", kernel_backend="xla", num_pages=64, max_batch_size=4, max_prefill_tokens=16,
             max_model_len=48, compile_cache_dir=None)

SCRIPT = textwrap.dedent('''
    import json, sys, time
    T0 = time.time()

    def mark(what):  # on stderr, shown when the test fails: where a slow or stuck run was
        print(f"process {sys.argv[1]} at {time.time() - T0:.1f} s: {what}", file=sys.stderr, flush=True)

    import jax
    import slora_jax as sj
    from sharding import HostBroadcast
    HostBroadcast.ACK_EVERY = 4  # read messages are deleted within this run's few dozen
    pid, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    prompts, adapters, max_tokens, small = json.loads(sys.argv[4])
    config = sj.EngineConfig(tensor_parallel=2, distributed_coordinator="127.0.0.1:" + port, num_processes=2,
                             process_id=pid, **small)
    eng = sj.Engine.from_pretrained(root + "/model", config=config)
    # One mesh over both processes, one device of it here; the pool is split over both.
    assert (jax.process_count(), len(jax.devices()), len(jax.local_devices())) == (2, 2, 1)
    assert eng.runner.pool.sharding.mesh.devices.size == 2 and not eng.runner.pool.is_fully_addressable
    eng.load_adapter("a", root + "/adapter")
    mark("engine built")
    sampling = sj.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    res = {}
    # Both processes submit the same requests: each gets every output, under process 0's request ids.
    outs = eng.generate(prompts, adapters=adapters, sampling=sampling)
    res["both"] = [o.token_ids for o in outs]
    res["ids"] = [o.request_id for o in outs]
    mark("generated")
    res["logits"] = [l.tolist() for l in eng.logits(prompts[:1], adapters=adapters[:1])]
    # Process 0 alone submits (as a server does); process 1 runs its calls until it is stopped.
    if pid == 0:
        outs = eng.generate(prompts[::-1], adapters=adapters[::-1], sampling=sampling)
        res["led"] = [o.token_ids for o in outs][::-1]
        eng.unload_adapter("a")
        eng.stop_followers()
        from jax._src import distributed
        store = distributed.global_state.client
        res["kept"] = []
        for seq in (0, eng._shared.channel._seq - 1):  # the first message read by all, the last one
            try:
                store.key_value_try_get_bytes(f"slora_jax/engine0/{seq}")
                res["kept"].append(seq)
            except Exception:
                pass
    else:
        eng.follow()
    res["adapters"] = eng.adapter_names()
    mark("done")
    print("RESULT " + json.dumps(res), flush=True)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multiprocess")
    cfg = tiny_llama_config()
    write_random_checkpoint(root / "model", cfg, seed=3, std=0.08)
    write_random_adapter(root / "adapter", cfg, rank=8, target_modules=("q_proj", "v_proj", "down_proj"), seed=1,
                         init_scale=0.3)
    return root


@pytest.mark.slow  # a two-process job, then a reference engine: ~18 s on two cores
def test_two_processes_serve_the_single_process_tokens(files):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    port = str(_free_port())
    spec = json.dumps([PROMPTS, ADAPTERS, MAX_TOKENS, SMALL])
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(pid), port, str(files), spec], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    outputs = []
    try:
        for p in procs:  # a hang (a process waiting on the other) fails here instead of stalling the suite
            outputs.append(p.communicate(timeout=max(1.0, 150 - (time.monotonic() - t0))))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    results = []
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out + err[-4000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))

    eng = sj.Engine.from_pretrained(files / "model", config=sj.EngineConfig(**SMALL))
    eng.load_adapter("a", files / "adapter")
    want = [o.token_ids for o in eng.generate(PROMPTS, adapters=ADAPTERS,
                                              sampling=sj.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]
    want_logits = eng.logits(PROMPTS[:1], adapters=ADAPTERS[:1])[0]
    assert len(want) == 3 and all(len(t) == MAX_TOKENS for t in want)
    for res in results:
        assert res["both"] == want
        got = np.asarray(res["logits"][0], np.float32)
        assert float(np.abs(got - want_logits).max() / np.abs(want_logits).max()) < 1e-5
    assert results[0]["ids"] == results[1]["ids"]
    assert results[0]["led"] == want
    assert len(results[0]["kept"]) == 1 and results[0]["kept"][0] > 0  # the first message is gone, not the last
    # process 1 replayed process 0's unload
    assert results[0]["adapters"] == results[1]["adapters"] == []


@pytest.mark.slow
def test_serve_over_two_processes(files):
    """`slora-jax serve` on two processes: process 0 answers HTTP with the single-process tokens (a scoring
    pass too), process 1 follows, and both end when process 0 is stopped."""
    import httpx

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("XLA_FLAGS", None)
    port, job = _free_port(), str(_free_port())
    common = [sys.executable, "-m", "slora_jax", "serve", "--model", str(files / "model"),
              "--adapter", f"a={files / 'adapter'}", "--dtype", "float32", "--kernel-backend", "xla",
              "--tensor-parallel", "2", "--num-pages", "64", "--max-batch-size", "4", "--no-precompile",
              "--coordinator-address", f"127.0.0.1:{job}", "--num-processes", "2"]
    leader, follower = (subprocess.Popen(common + extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
                        for extra in (["--process-id", "0", "--port", str(port)], ["--process-id", "1"]))
    procs = [leader, follower]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the job did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        got = []
        for prompt, adapter in zip(PROMPTS, ADAPTERS):
            body = {"model": adapter or "model", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True, "logprobs": 1, "echo": True}
            resp = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert resp.status_code == 200, resp.text
            tokens = resp.json()["choices"][0]["logprobs"]["tokens"][len(prompt):]
            got.append([int(t.split(":")[1]) for t in tokens])
        leader.send_signal(signal.SIGTERM)  # a server's stop: the follower ends with it
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "process 1: process 0 stopped" in outs[1]
    eng = sj.Engine.from_pretrained(files / "model", config=sj.EngineConfig(**SMALL))
    eng.load_adapter("a", files / "adapter")
    want = [o.token_ids for o in eng.generate(PROMPTS, adapters=ADAPTERS,
                                              sampling=sj.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]
    assert got == want


def _req(rid: str, prompt: list, adapter=None) -> Request:
    return Request(request_id=rid, prompt=prompt, adapter=adapter, sampling=SamplingParams(max_tokens=3), seed=0,
                   max_len=64, metrics=RequestMetrics(arrival_time=0.0))


def test_a_request_process_0_did_not_submit_is_named():
    mine = [("add", _req("req-0-x", [1, 2])), ("add", _req("req-1-x", [3]))]
    theirs = [("add", _req("req-0-x", [1, 2])), ("add", _req("req-1-x", [4]))]
    assert SharedInbox._unmatched(mine, mine) is None
    assert SharedInbox._unmatched([], theirs) is None  # a following process submits nothing
    msg = SharedInbox._unmatched(mine, theirs)
    assert "1 request(s)" in msg and "req-1-x" in msg


@pytest.mark.parametrize("kw, words", [
    (dict(distributed_coordinator="127.0.0.1:1234"), "num_processes, process_id missing"),
    (dict(distributed_coordinator="nohost", num_processes=2, process_id=0), "host:port"),
    (dict(distributed_coordinator="h:99999", num_processes=2, process_id=0), "host:port"),
    (dict(distributed_coordinator="h:1234", num_processes=0, process_id=0), "num_processes"),
    (dict(distributed_coordinator="h:1234", num_processes=2, process_id=2), "process_id must be an integer in [0, 2)"),
])
def test_bad_distributed_settings_are_refused(kw, words):
    with pytest.raises(sj.ConfigError) as e:
        sj.EngineConfig(**kw)
    assert words in str(e.value)


def test_joining_a_job_after_jax_started_is_refused():
    import jax

    jax.devices()  # this process's devices are in use: too late to join a job
    config = sj.EngineConfig(distributed_coordinator=f"127.0.0.1:{_free_port()}", num_processes=2, process_id=0,
                             **SMALL)
    with pytest.raises(sj.ConfigError, match="before anything touches a device"):
        sj.Engine(tiny_llama_config(), {}, config)
