"""``slora-jax demo``: the whole path on an embedded default, in well under a minute on a laptop CPU.

Writes a small random Llama-architecture checkpoint (with a byte-level BPE tokenizer and a chat template,
so the README's server examples run on it) and a few PEFT adapters (different ranks and target modules) to
a cache folder, loads them like any Hugging Face / PEFT folder, serves one mixed-adapter batch and prints
each request's adapter, output and the throughput.
"""

from __future__ import annotations

import dataclasses
import json
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


# Text the demo tokenizer's merges are learned from: English prose, SQL and French, the languages of the
# README's examples, so that their prompts take a few tokens each instead of one per byte.
DEMO_CORPUS = """
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the ones before it.
Serving many adapters over one base model keeps the base weights shared while each request adds its own
low-rank update. List the tables in the database, then summarize what each one holds. Write a short answer.
You are a helpful assistant. Answer the question in one sentence. What is the capital of France? Paris.
Tell me a story about a robot who learns to paint. The robot painted the sea, the sky and the mountains.
SELECT name, email FROM users WHERE created_at > '2024-01-01' ORDER BY name LIMIT 10;
SELECT COUNT(*) FROM orders GROUP BY customer_id HAVING COUNT(*) > 5;
INSERT INTO tables (id, name) VALUES (1, 'users'); UPDATE users SET name = 'Ada' WHERE id = 1;
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, total REAL, created_at TEXT);
Un poème sur la mer, le vent et la lumière du soir. Les vagues chantent sous la lune et les étoiles.
Je suis un poète qui écrit des vers pour le printemps, pour les fleurs et pour les oiseaux du matin.
Il était une fois une princesse qui vivait dans un château au bord de la mer. Elle aimait les poèmes.
The support team answers questions about accounts, orders, refunds and shipping within one business day.
Thank you for contacting support. Your order has shipped and will arrive in three to five days.
"""
DEMO_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Llama-2-chat-like turns with the demo tokenizer's role tokens; the server renders it with jinja2.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write_demo_tokenizer(model_dir, vocab_size: int, bos_id: int = 1, eos_id: int = 2) -> Path:
    """Train a byte-level BPE tokenizer (every byte encodes, so any text works) of at most ``vocab_size``
    ids on DEMO_CORPUS and write tokenizer.json + tokenizer_config.json (chat template included) into
    ``model_dir``, as a Hugging Face checkpoint ships them. ``<s>``/``</s>`` get ``bos_id``/``eos_id``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if DEMO_SPECIAL_TOKENS.index("<s>") != bos_id or DEMO_SPECIAL_TOKENS.index("</s>") != eos_id:
        raise ValueError(f"the demo tokenizer puts <s>, </s> at ids 1, 2; the model says {bos_id}, {eos_id}")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(DEMO_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([line for line in DEMO_CORPUS.splitlines() if line], trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"the demo tokenizer has {tok.get_vocab_size()} ids; the model has {vocab_size}")
    # Prompts start with <s>, as Llama's tokenizer makes them (add_special_tokens=True).
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos_id)])
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": demo_model_config().max_position_embeddings,
              "add_bos_token": True, "chat_template": DEMO_CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def prepare(cache_dir) -> tuple[Path, dict[str, Path]]:
    """Write (once) the demo checkpoint and adapters; returns their folders."""
    from slora_jax.model.random_checkpoint import write_random_adapter, write_random_checkpoint

    root = Path(cache_dir or Path.home() / ".cache" / "slora-jax" / "demo").expanduser()
    cfg = demo_model_config()
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        # std 0.1 keeps the random model's distributions peaked enough that adapters visibly change text
        write_random_checkpoint(model_dir, cfg, seed=0, std=0.1)
    if not (model_dir / "tokenizer.json").exists():  # also upgrades a demo folder written without one
        write_demo_tokenizer(model_dir, cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_ids[0])
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
