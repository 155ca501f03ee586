"""Does a compiled program survive serialize -> deserialize_and_load when JAX's persistent cache supplied it?

Run twice in fresh processes over one cache folder: the first run compiles (a cache miss), the second loads
the same program from JAX's cache (a hit). Each run serializes its executable, loads it back and compares its
output with a plain-JAX reference. On the CPU (jax 0.10.2) the hit's copy fails at run time with
"Function ... not found"; this says whether the GPU does the same."""

import argparse
import datetime
import json
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.serialize_executable import deserialize_and_load, serialize


def _scale_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 3.0 + 1.0


def program(x, w):
    interpret = jax.default_backend() == "cpu"
    y = pl.pallas_call(_scale_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret)(x)
    z = jnp.sin(y) @ w + jnp.arange(w.shape[1], dtype=x.dtype)
    return jnp.cumsum(z, axis=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--phase", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    jax.config.update("jax_compilation_cache_dir", a.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(threading.get_ident()) if name == "/jax/compilation_cache/cache_hits" else None)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((128, 128)), jnp.float32)
    ref = np.asarray(jax.jit(program).lower(x, w).compile()(x, w))  # compiled once here; a hit or a miss
    hit = bool(hits)
    compiled = jax.jit(program).lower(x, w).compile()
    res = dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command="python " + " ".join(sys.argv), phase=a.phase, backend=jax.default_backend(),
               jax_cache_hit=hit)
    try:
        payload, i, o = serialize(compiled)
        exe = deserialize_and_load(payload, i, o)
        got = np.asarray(exe(x, w))
        res.update(ok=bool(np.allclose(got, ref, rtol=1e-4, atol=1e-3)), payload_bytes=len(payload))
    except Exception as e:  # noqa: BLE001 - what failed is the result
        res.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    print(json.dumps(res))
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
