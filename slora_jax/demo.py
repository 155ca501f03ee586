"""``slora-jax demo``: the whole path on an embedded default, in well under a minute on a laptop CPU.

Writes a small random Llama-architecture checkpoint and a few PEFT adapters (different ranks and target
modules) to a cache folder, loads them like any Hugging Face / PEFT folder, serves one mixed-adapter batch
and prints each request's adapter, output and the throughput.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

DEMO_ADAPTERS = {
    # name: (rank, alpha, target modules, rsLoRA)
    "support-bot": (8, 16, ("q_proj", "v_proj"), False),
    "sql-writer": (16, 32, ("q_proj", "k_proj", "v_proj", "o_proj"), False),
    "poet": (32, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), True),
    "summarizer": (4, 8, ("gate_proj", "up_proj", "down_proj"), False),
}


def demo_model_config():
    from slora_jax.model.random_checkpoint import tiny_llama_config

    return tiny_llama_config(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
                             num_heads=8, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                             name="slora-demo-llama")


def prepare(cache_dir) -> tuple[Path, dict[str, Path]]:
    """Write (once) the demo checkpoint and adapters; returns their folders."""
    from slora_jax.model.random_checkpoint import write_random_adapter, write_random_checkpoint

    root = Path(cache_dir or Path.home() / ".cache" / "slora-jax" / "demo").expanduser()
    cfg = demo_model_config()
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        # std 0.1 keeps the random model's distributions peaked enough that adapters visibly change text
        write_random_checkpoint(model_dir, cfg, seed=0, std=0.1)
    adapters = {}
    for i, (name, (rank, alpha, targets, rs)) in enumerate(DEMO_ADAPTERS.items()):
        d = root / "adapters" / name
        if not (d / "adapter_model.safetensors").exists():
            write_random_adapter(d, cfg, rank=rank, alpha=alpha, target_modules=targets, seed=100 + i, init_scale=0.3,
                                 use_rslora=rs)
        adapters[name] = d
    return model_dir, adapters


def run_demo(args) -> int:
    import slora_jax as sj

    t_start = time.perf_counter()
    model_dir, adapter_dirs = prepare(args.cache_dir)
    engine = sj.Engine.from_pretrained(model_dir, config=sj.EngineConfig(
        dtype=args.dtype, kernel_backend=args.kernel_backend, num_pages=4096, max_batch_size=32))
    for name, d in adapter_dirs.items():
        info = engine.load_adapter(name, d)
        print(f"loaded adapter {name:<12} rank {info.rank:>2}  targets {','.join(info.target_modules)}")
    names = [None] + list(adapter_dirs)
    prompts, adapters, samplings = [], [], []
    for i in range(args.requests):
        prompts.append([1] + [(7 * i + 3 * j) % 500 + 3 for j in range(5 + i % 7)])
        adapters.append(names[i % len(names)])
        # Half greedy, half sampled with a seed: the batch mixes sampling settings too.
        samplings.append(sj.SamplingParams(max_tokens=args.max_tokens, ignore_eos=True) if i % 2 == 0 else
                         sj.SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.9, seed=i,
                                           ignore_eos=True))
    # Compile the batch's shapes first, so the timing below is serving, not compiling.
    engine.generate(prompts, adapters=adapters, sampling=[dataclasses.replace(s, max_tokens=2) for s in samplings])
    t0 = time.perf_counter()
    outs = engine.generate(prompts, adapters=adapters, sampling=samplings)
    dt = time.perf_counter() - t0
    print(f"\n{'request':<8} {'adapter':<12} {'sampling':<9} output token ids")
    for i, out in enumerate(outs):
        kind = "greedy" if samplings[i].temperature == 0 else "sampled"
        ids = " ".join(map(str, out.token_ids[:16])) + (" ..." if len(out.token_ids) > 16 else "")
        print(f"{i:<8} {str(adapters[i] or '(base)'):<12} {kind:<9} {ids}")
    generated = sum(len(o.token_ids) for o in outs)
    st = engine.stats()
    print(f"\n{len(outs)} requests over {len(adapter_dirs)} adapters + base in one batch: {generated} tokens in "
          f"{dt:.2f} s = {generated / dt:.1f} tokens/s ({engine.kernel_backend} kernels, {args.dtype}, "
          f"{st['steps']} steps, {st['compiled_shapes']} compiled shapes; {time.perf_counter() - t_start:.1f} s "
          f"in all)")
    return 0
