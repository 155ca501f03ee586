"""Tensor parallelism on real devices: TP=N against TP=1, and the collectives of a compiled step.

    python benchmarks/tp_check.py --tp 2 --out tp_check.json            (GPU: 2 devices; CPU: --tiny)

1. Correctness: one engine per TP size over the same random weights (kernel backend as given, Pallas by
   default on GPU), a mixed batch of base requests and adapters of ranks 8-64 on every projection: relative
   error of TP=N's prompt logits against TP=1's, and the share of greedy tokens that agree.
2. Structure: the decode step (B rows) of the TP=N engine compiled, its collectives listed with their
   bytes: Megatron's two all-reduces of [B, H] per layer, and the sampler's small reductions.
Prints a short table and writes JSON (device, jax version, date, command, numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

import slora_jax as sj
from slora_jax.adapters.synthetic import random_lora
from slora_jax.config import MODULES
from slora_jax.model.init import named_config, random_params
from slora_jax.model.random_checkpoint import tiny_llama_config

_COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\]\{[^}]*\} (all-reduce|all-gather|collective-permute|all-to-all|"
                         r"reduce-scatter)(-start)?\(")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def collectives(hlo: str) -> list[dict]:
    out = []
    for m in _COLLECTIVE.finditer(hlo):
        dims = [int(d) for d in m.group(2).split(",") if d]
        n = int(np.prod(dims)) if dims else 1
        out.append(dict(op=m.group(3), type=f"{m.group(1)}[{m.group(2)}]", elements=n,
                        bytes=n * _BYTES.get(m.group(1), 4)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny float32 model (CPU with simulated devices)")
    ap.add_argument("--model", default="llama-3-8b", help="named shape (e.g. llama-3-70b), its first --layers")
    ap.add_argument("--layers", type=int, default=4, help="layers of the shape checked for correctness")
    ap.add_argument("--kernel-backend", default="auto")
    ap.add_argument("--batch", type=int, default=256, help="rows of the decode step whose collectives are listed")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="float32 separates a layout error (large) from rounding (bfloat16 partial sums)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        cfg, dtype, dt = tiny_llama_config(), "float32", jnp.float32
    else:
        cfg = dataclasses.replace(named_config(args.model), num_layers=args.layers)
        dtype = args.dtype
        dt = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]
    params = random_params(cfg, dt, seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size - 1, int(n)).tolist() for n in rng.integers(5, 60, 12)]
    loras = {f"r{r}": random_lora(cfg, r, targets=MODULES, seed=r, std=0.05) for r in (8, 16, 32, 64)}
    names = [None, "r8", "r16", "r32", "r64", None] * 2
    res = {}
    for tp in (1, args.tp):
        eng = sj.Engine(cfg, params, sj.EngineConfig(
            dtype=dtype, tensor_parallel=tp, kernel_backend=args.kernel_backend, num_pages=4096 if not args.tiny
            else 2048, max_batch_size=args.batch, max_model_len=128, max_lora_rank=64, scan_layers=False))
        for n, lw in loras.items():
            eng.load_adapter_weights(n, lw)
        logits = eng.logits(prompts, adapters=names)
        outs = eng.generate(prompts, adapters=names, sampling=sj.SamplingParams(max_tokens=16, ignore_eos=True))
        res[tp] = dict(logits=logits, tokens=[o.token_ids for o in outs], backend=eng.kernel_backend)
        if tp == args.tp:
            found = collectives(eng.lower_step("decode", args.batch).compile().as_text())
        del eng
    errs = [float(np.linalg.norm(a - b) / np.linalg.norm(a)) for a, b in zip(res[1]["logits"], res[args.tp]["logits"])]
    agree = [float(np.mean(np.array(a) == np.array(b))) for a, b in zip(res[1]["tokens"], res[args.tp]["tokens"])]
    H = cfg.hidden_size
    # XLA:GPU flattens the [B, H] operand: match by element count.
    residual = [c for c in found if c["op"] == "all-reduce" and c["elements"] == args.batch * H]
    record = dict(device=str(jax.devices()[0].device_kind), num_devices=len(jax.devices()),
                  jax_version=jax.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command="python " + " ".join(sys.argv), model=dict(name=cfg.name, layers=cfg.num_layers, hidden=H, dtype=dtype),
                  tp=args.tp, kernel_backend=res[args.tp]["backend"], logits_rel_err=errs, greedy_agreement=agree,
                  decode_batch=args.batch, collectives=found, residual_all_reduces=len(residual),
                  residual_all_reduce_bytes=sum(c["bytes"] for c in residual),
                  other_collective_bytes=sum(c["bytes"] for c in found if c not in residual))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    print(f"TP={args.tp} vs TP=1, {record['kernel_backend']}, {cfg.num_layers} layers, {dtype}")
    print(f"  logits rel err: max {max(errs):.2e}, mean {np.mean(errs):.2e}; greedy agreement min {min(agree):.2f}")
    print(f"  decode B={args.batch}: {len(residual)} residual all-reduces ({2 * cfg.num_layers} expected), "
          f"{record['residual_all_reduce_bytes'] / 1e6:.2f} MB; other collectives: "
          f"{len(found) - len(residual)}, {record['other_collective_bytes'] / 1e3:.1f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
