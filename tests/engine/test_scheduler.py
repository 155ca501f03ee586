"""The scheduler's step plans: mixed decode + prompt chunks under a token budget, and the free-page watermark."""

import numpy as np

from tests.bench.sim import Sim


def test_each_step_decodes_every_running_request_and_chunks_prompts_within_the_budget():
    sim = Sim(max_batch_size=4, max_prefill_tokens=16)  # a budget of 16 tokens a step
    assert sim.sched.token_budget == 16
    long = sim.add(40, 5)
    sim.step()
    short = [sim.add(6, 5) for _ in range(2)]
    plans = []
    while sim.sched.has_work():
        plans.append(sim.step())
    for out in plans:
        assert out.num_tokens <= 16
        # Every running request past its prompt decodes in every step; no step is prompt-only while it does.
        running = [r for r in out.requests if r not in [c.req for c in out.chunks]]
        assert {id(r) for r in out.decode} == {id(r) for r in running}
    # The 40-token prompt took three steps of chunks that continue where the last one stopped.
    first = [c for out in [None] + plans if out for c in out.chunks if c.req is long]
    assert [(c.start, c.count) for c in first] == [(16, 16), (32, 8)]
    assert first[-1].samples and not first[0].samples
    assert all(r.finish_reason == "length" and len(r.output) == 5 for r in [long] + short)
    assert sim.pool.free_pages == sim.pool.total_pages and sim.pool.stats()["kv_pages"] == 0  # all back


def _s2_like(kv_watermark: float, seed: int = 0):
    """Many requests over many adapters in a pool that holds a fraction of what they want."""
    rng = np.random.default_rng(seed)
    adapters = {f"a{i}": int(r) for i, r in enumerate(rng.choice([8, 16, 32], 24))}
    sim = Sim(num_pages=150, adapters=adapters, max_batch_size=16, max_prefill_tokens=64,
              kv_watermark=kv_watermark)
    reqs = [sim.add(int(rng.integers(8, 48)), int(rng.integers(8, 64)), f"a{int(rng.integers(0, 24))}")
            for _ in range(60)]
    sim.run()
    return sim, reqs


def test_watermark_cuts_preemptions_and_every_request_still_finishes():
    without, reqs0 = _s2_like(0.0)
    with_wm, reqs1 = _s2_like(0.1)
    assert without.sched.num_preemptions > 0  # the pool is tight enough to matter
    assert with_wm.sched.num_preemptions < without.sched.num_preemptions / 2
    assert len(with_wm.outputs) < 1.15 * len(without.outputs)  # at about the same number of steps
    for sim, reqs in ((without, reqs0), (with_wm, reqs1)):
        assert all(r.finish_reason == "length" and len(r.output) == r.sampling.max_tokens for r in reqs)
        sim.pool.check_invariants()


def test_chunked_prompts_under_page_pressure_preempt_and_all_finish():
    """Five requests chunked 16 tokens a step through a pool of 15 usable pages: prompts and decode tokens run
    out of pages, the newest requests give theirs back and are recomputed, and every request finishes with
    every page returned."""
    rng = np.random.default_rng(1)
    sim = Sim(num_pages=16, max_batch_size=3, max_prefill_tokens=16, kv_watermark=0.0)
    reqs = [sim.add(int(rng.integers(20, 90)), int(rng.integers(2, 30))) for _ in range(5)]
    sim.run(max_steps=2000)
    assert all(r.finish_reason == "length" and len(r.output) == r.sampling.max_tokens for r in reqs)
    assert sim.sched.num_preemptions > 0
    assert sim.pool.stats()["kv_pages"] == 0
