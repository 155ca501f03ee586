"""What the every-group LoRA variant costs a batch of q/k/v/o adapters.

A step program runs LoRA kernels for the groups the registered adapters target together; once an adapter
with MLP targets is registered, q/k/v/o batches run the program with every group, whose MLP kernels find rank 0
for all of them. (It is also what a fallback to a precompiled every-group program would cost: NOTES.) This times the same
requests (B requests, each on its own q/k/v/o adapter, ``--tokens`` output tokens each) three times in one
engine: q/k/v/o adapters only ("union"), with one MLP adapter registered that no request uses ("every group"),
and after unloading it ("union" again, for the spread). Each pass is run once untimed first, so that its
programs are compiled outside the timing. Prints a table and writes JSON.
"""

import argparse
import datetime
import json
import os
import sys
import time

import jax

import slora_jax as sj
from slora_jax.bench.setup import SyntheticAdapters, resolve_model
from slora_jax.model.init import random_fused_params


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "variant_cost.json"))
    a = ap.parse_args()

    cfg = resolve_model(a.model)[0]
    econf = sj.EngineConfig(dtype=a.dtype, max_batch_size=a.batch, max_model_len=a.input_len + a.tokens + 16,
                            max_adapters_on_device=a.adapters + 1, host_cache_bytes=1 << 30,
                            memory_fraction=0.6 if jax.default_backend() == "gpu" else 1.0,
                            num_pages=None if jax.default_backend() == "gpu" else 4096)
    engine = sj.Engine(cfg, random_fused_params(cfg, a.dtype, seed=0,
                                                scan_layers=econf.resolved_scan_layers(jax.default_backend())),
                       econf)
    qkvo = SyntheticAdapters(cfg, (8, 16, 32, 64))
    names = qkvo.register(engine, a.adapters)
    mlp = SyntheticAdapters(cfg, (16,), targets=("gate_proj", "up_proj", "down_proj"), prefix="mlp")
    prompts = [[(7 * i + j) % (cfg.vocab_size - 3) + 3 for j in range(a.input_len)] for i in range(a.batch)]
    adapters = [names[i % len(names)] for i in range(a.batch)]
    sp = sj.SamplingParams(max_tokens=a.tokens, ignore_eos=True)

    def timed(label):
        engine.generate(prompts, adapters=adapters, sampling=sp)  # compiles this pass's programs
        t0 = time.perf_counter()
        outs = engine.generate(prompts, adapters=adapters, sampling=sp)
        wall = time.perf_counter() - t0
        toks = sum(len(o.token_ids) for o in outs)
        return dict(case=label, lora_groups=list(engine.lora_variants()[1]), wall_s=wall, out_tok_s=toks / wall)

    rows = [timed("union")]
    engine.load_adapter_weights("mlp-only", mlp.weights(0))
    rows.append(timed("every group"))
    engine.unload_adapter("mlp-only")
    rows.append(timed("union again"))
    base = (rows[0]["out_tok_s"] + rows[2]["out_tok_s"]) / 2
    for r in rows:
        r["vs_union"] = r["out_tok_s"] / base
    out = dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command="python " + " ".join(sys.argv), model=a.model, batch=a.batch, adapters=a.adapters,
               input_len=a.input_len, tokens=a.tokens, rows=rows)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"\n{out['device']}, jax {jax.__version__}, {a.model}: {a.batch} requests of {a.input_len}/{a.tokens}, "
          f"{a.adapters} q/k/v/o adapters")
    print(f"{'case':14s} {'groups':34s} {'out tok/s':>10s} {'vs union':>9s}")
    for r in rows:
        print(f"{r['case']:14s} {','.join(r['lora_groups']):34s} {r['out_tok_s']:10.0f} {r['vs_union']:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
