"""What do adapter-sized host transfers cost a step loop running beside them?

The cold 1000-adapter pass spent 71 s of its 95 s in the engine thread's step launch while reads were under
way, and ~5 s in the same launch once every adapter was in host memory. This times a step-like loop of jitted
matmuls on the main thread while a second thread moves ``--adapters`` copies of a ``--adapter-mb`` array one
of several ways:

- ``none``: nothing (the reference);
- ``reserve`` (with ``--reserve-gib``): one pinned array that size, freed at once (what the engine does);
- ``pinned_new``: numpy -> a new array in pinned host memory, kept (the host tier's copy today);
- ``pinned_again``: the same after the first ones were freed (the pinned allocator already grown);
- ``pinned_x8``: the same from 8 threads at once (the engine's reader threads);
- ``pinned_to_device``: pinned host arrays -> device (staging today);
- ``pageable_to_device``: numpy -> device;
- ``dma_map``: registering one numpy arena of all the copies with the client (``client.dma_map``), timed;
- ``dma_to_device``: a copy into that registered arena, then arena slice -> device;
- ``shm_dma_map`` / ``shm_dma_to_device``: the same over a /dev/shm file mapping (reader processes could
  write there); ``shm_dma_only``: the transfers from it alone, with no copy in;
- ``pinned_x8_again``: ``pinned_x8`` once more, last.

Prints a table (step mean / p99 / max ms, stalls over 3x the reference, background GB/s) and writes JSON.
"""

import argparse
import datetime
import json
import mmap
import os
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np


def step_loop(f, x, stop: threading.Event, min_steps: int, inputs: int) -> list:
    """Run ``f`` step after step; with ``inputs``, each step also takes that many bytes of fresh numpy input,
    as the engine's steps do (token ids, positions, tables), so their transfer is part of the launch."""
    times = []
    rng = np.random.default_rng(1)
    feed = [rng.integers(0, 100, max(inputs, 4) // 4, dtype=np.int32) for _ in range(4)]
    y = f(x, feed[0])
    y.block_until_ready()
    while not stop.is_set() or len(times) < min_steps:
        t0 = time.perf_counter()
        y = f(x, feed[len(times) % 4].copy())
        y.block_until_ready()
        times.append(time.perf_counter() - t0)
    return times


def run_variant(name, f, x, work, min_steps, inputs) -> dict:
    stop = threading.Event()
    result = {}

    def bg():
        t0 = time.perf_counter()
        try:
            result.update(work() or {})
        except Exception as e:  # noqa: BLE001 - reported in the table
            result["error"] = f"{type(e).__name__}: {e}"
        result["bg_s"] = time.perf_counter() - t0
        stop.set()

    th = threading.Thread(target=bg)
    th.start()
    times = step_loop(f, x, stop, min_steps, inputs)
    th.join()
    t = np.array(times) * 1e3
    return dict(variant=name, steps=len(t), _times=t, mean_ms=float(t.mean()), p50_ms=float(np.median(t)),
                p99_ms=float(np.percentile(t, 99)), max_ms=float(t.max()), total_step_s=float(t.sum() / 1e3),
                **result)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--adapter-mb", type=float, default=51.0)
    ap.add_argument("--size", type=int, default=4096, help="the step loop's matmul size")
    ap.add_argument("--min-steps", type=int, default=200)
    ap.add_argument("--inputs", type=int, default=0, help="bytes of fresh numpy input each step takes")
    ap.add_argument("--reserve-gib", type=float, default=0.0,
                    help="first reserve this much pinned memory (slora_jax.memory.pinned.reserve), as the engine does")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "host_transfer.json"))
    a = ap.parse_args()

    dev = jax.devices()[0]
    client = dev.client
    n = int(a.adapter_mb * 1e6) // 2
    nbytes = n * 2
    rng = np.random.default_rng(0)
    src = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    device = jax.sharding.SingleDeviceSharding(dev, memory_kind=dev.default_memory().kind)
    w = jnp.asarray(rng.standard_normal((a.size, a.size)), jnp.bfloat16)
    xin = jnp.asarray(rng.standard_normal((a.size, a.size)), jnp.bfloat16)

    @jax.jit
    def f(x, feed):
        for _ in range(8):
            x = (x @ w) * 0.01
        return x + feed[0].astype(x.dtype) * (0 if a.inputs == 0 else 1e-6)

    total = a.adapters * nbytes
    rows = []
    keep = []

    def gbps(t):
        return {"gbps": total / t / 1e9}

    def pinned_new():
        t0 = time.perf_counter()
        for _ in range(a.adapters):
            keep.append(jax.device_put(src, pinned).block_until_ready())
        return gbps(time.perf_counter() - t0)

    def pinned_new_x8():
        from concurrent.futures import ThreadPoolExecutor
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as ex:
            keep.extend(ex.map(lambda _: jax.device_put(src, pinned).block_until_ready(), range(a.adapters)))
        return gbps(time.perf_counter() - t0)

    def pinned_to_device():
        t0 = time.perf_counter()
        for h in keep:
            jax.device_put(h, device).block_until_ready()
        return gbps(time.perf_counter() - t0)

    def pageable_to_device():
        t0 = time.perf_counter()
        for _ in range(a.adapters):
            jax.device_put(src, device).block_until_ready()
        return gbps(time.perf_counter() - t0)

    arenas = {}

    def make_arena(kind):
        if kind == "anon":
            mm = mmap.mmap(-1, total)
        else:
            fd, path = tempfile.mkstemp(dir="/dev/shm")
            os.posix_fallocate(fd, 0, total)
            mm = mmap.mmap(fd, total)
            os.close(fd)
            os.unlink(path)
        arr = np.frombuffer(mm, np.uint16)
        arr[:: 2048] = 0  # touch every page before registering
        return mm, arr

    def dma_map(kind):
        def work():
            mm, arr = make_arena(kind)
            arenas[kind] = (mm, arr)
            t0 = time.perf_counter()
            client.dma_map(arr.ctypes.data, arr.nbytes)
            return {"map_s": time.perf_counter() - t0, **gbps(time.perf_counter() - t0)}
        return work

    def dma_to_device(kind):
        def work():
            _, arr = arenas[kind]
            t0 = time.perf_counter()
            copy_s = 0.0
            bad = 0
            for i in range(a.adapters):
                view = arr[i * n:(i + 1) * n]
                c0 = time.perf_counter()
                np.copyto(view, src)
                copy_s += time.perf_counter() - c0
                d = jax.device_put(view, device).block_until_ready()
                if i % 25 == 0:
                    bad += int(not np.array_equal(np.asarray(d), src))
            return {"copy_s": copy_s, "mismatches": bad, **gbps(time.perf_counter() - t0)}
        return work

    def dma_only(kind):
        def work():  # the arena already holds the tiles (a reader process wrote them): transfers alone
            _, arr = arenas[kind]
            t0 = time.perf_counter()
            for i in range(a.adapters):
                jax.device_put(arr[i * n:(i + 1) * n], device).block_until_ready()
            return gbps(time.perf_counter() - t0)
        return work

    def reserve():
        from slora_jax.memory.pinned import reserve as reserve_pinned
        got, secs = reserve_pinned(lambda x: jax.device_put(x, pinned), int(a.reserve_gib * (1 << 30)))
        return {"reserved_gib": got / (1 << 30), "reserve_s": secs}

    # (name, work, whether the pinned arrays kept so far are freed first: "again" runs reuse what they pinned)
    variants = [("none", lambda: {}, False)] + ([("reserve", reserve, False)] if a.reserve_gib else []) + [
                ("pinned_new", pinned_new, False), ("pinned_again", pinned_new, True),
                ("pinned_x8", pinned_new_x8, True), ("pinned_to_device", pinned_to_device, False),
                ("pageable_to_device", pageable_to_device, False),
                ("dma_map", dma_map("anon"), False), ("dma_to_device", dma_to_device("anon"), False),
                ("shm_dma_map", dma_map("shm"), False), ("shm_dma_to_device", dma_to_device("shm"), False),
                ("shm_dma_only", dma_only("shm"), False), ("pinned_x8_again", pinned_new_x8, True)]
    for name, work, free_first in variants:
        if free_first:
            keep.clear()
        rows.append(run_variant(name, f, xin, work, min_steps=a.min_steps, inputs=a.inputs))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "_times"}), flush=True)
    for kind, (mm, arr) in arenas.items():
        try:
            client.dma_unmap(arr.ctypes.data)
        except Exception as e:  # noqa: BLE001
            print(f"dma_unmap {kind}: {e}")

    ref = rows[0]["mean_ms"]
    for r in rows:  # steps slower than 3x the reference's median, and the time they lost beyond it
        t = r.pop("_times")
        slow = t[t > 3 * rows[0]["p50_ms"]]
        r["stalls"], r["stall_s"] = int(slow.size), float((slow - rows[0]["p50_ms"]).sum() / 1e3)
    out = dict(device=dev.device_kind, jax_version=jax.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command="python " + " ".join(sys.argv), adapter_bytes=nbytes, adapters=a.adapters, step_inputs_bytes=a.inputs, rows=rows)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"\n{dev.device_kind}, jax {jax.__version__}: {a.adapters} x {nbytes / 1e6:.0f} MB; steps take {a.inputs} B of input; reference "
          f"{ref:.2f} ms")
    print(f"{'variant':20s} {'steps':>6s} {'mean':>7s} {'p99':>7s} {'max':>8s} {'>3x ref':>8s} {'bg GB/s':>8s} "
          f"{'bg s':>6s}  extra")
    for r in rows:
        extra = {k: v for k, v in r.items() if k in ("map_s", "copy_s", "mismatches", "error",
                                                           "reserved_gib", "reserve_s")}
        print(f"{r['variant']:20s} {r['steps']:6d} {r['mean_ms']:7.2f} {r['p99_ms']:7.2f} {r['max_ms']:8.1f} "
              f"{r['stalls']:8d} {r.get('gbps', 0):8.2f} {r['bg_s']:6.2f}  {extra}")


if __name__ == "__main__":
    main()
