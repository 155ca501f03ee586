"""One K/V write and one page gather per call, against the pool's size and storage (CPU).

    python benchmarks/pool_write.py --pages 1024 16384 65536

Per call, jitted with the pool donated: `write_kv` of T tokens into layer 1, then `paged_decode_attention` of
one request over NB pages (the gather every reader makes). Storages: float32, bfloat16 as bf16 (XLA:CPU widens
the write into a float32 pass over the pool) and bfloat16 as uint16 bits (`pallas_kernels.pool_storage`, the
engine's CPU storage). Prints ms per call; the XLA ops run (a bits pool has no Pallas path).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk


def per_call_ms(storage, pages: int, layers: int, rows: int, width: int, tokens: int, blocks: int) -> float:
    elements = jnp.float32 if storage == "float32" else jnp.bfloat16
    pool = jnp.zeros((layers, pages, rows, width), jnp.uint16 if storage == "bits" else elements)
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((tokens, width)), elements)
    k_rows = jnp.asarray(rng.choice(pages * rows, tokens, replace=False), jnp.int32)
    q = jnp.asarray(rng.standard_normal((1, width // 16, 16)), elements)
    table = jnp.asarray(rng.choice(pages, (1, blocks), replace=False), jnp.int32)
    length = jnp.asarray([blocks * rows], jnp.int32)

    def step(pool, k):
        pool = pk.write_kv(pool, 1, k, k, k_rows, k_rows, implementation="xla")
        out = pk.paged_decode_attention(q, pool, 1, table, table, length, sm_scale=0.25, implementation="xla")
        return pool, out

    step = jax.jit(step, donate_argnums=0)
    pool, out = step(pool, k)
    out.block_until_ready()
    n = max(3, min(50, int(2e5 // pages)))
    t0 = time.perf_counter()
    for _ in range(n):
        pool, out = step(pool, k)
    out.block_until_ready()
    return (time.perf_counter() - t0) / n * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, nargs="+", default=[1024, 16384, 65536])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=16, help="rows per page (R)")
    ap.add_argument("--width", type=int, default=32, help="K/V row width (W)")
    ap.add_argument("--tokens", type=int, default=4, help="tokens written per call")
    ap.add_argument("--blocks", type=int, default=16, help="pages gathered per call")
    a = ap.parse_args()
    print(f"jax {jax.__version__}, {jax.default_backend()}; ms per call (write + gather)")
    print("| storage | " + " | ".join(f"P={p}" for p in a.pages) + " |")
    print("|---|" + "---|" * len(a.pages))
    for storage in ("float32", "bfloat16", "bits"):
        ms = [per_call_ms(storage, p, a.layers, a.rows, a.width, a.tokens, a.blocks) for p in a.pages]
        print(f"| {storage} | " + " | ".join(f"{m:.3f}" for m in ms) + " |", flush=True)


if __name__ == "__main__":
    main()
