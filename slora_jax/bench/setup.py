"""Building what a bench run serves: the base model (a checkpoint folder or a named shape with random
weights) and its adapters (synthetic random LoRAs, or PEFT folders registered lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from slora_jax.config import MODULES, EngineConfig, ModelConfig
from slora_jax.errors import ConfigError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the paper's adapters: attention projections


def resolve_model(spec: str) -> tuple[ModelConfig, Optional[str]]:
    """``spec``: a checkpoint folder, a named shape (``llama-2-7b`` ...) or ``tiny``. -> (config, folder or None).

    A named shape may keep only its first layers, ``llama-3-70b:layers=2``: a slice of a model too large for
    the devices at hand, with every layer's real shape (per-layer time and collectives). ``,vocab=N`` also
    shrinks the vocabulary (``llama-3-70b:layers=2,vocab=32000``): for a dry run on simulated CPU devices,
    where every device's copy of the replicated embedding table is host memory."""
    from slora_jax.model.init import NAMED_SHAPES, named_config
    from slora_jax.model.random_checkpoint import tiny_llama_config

    path = Path(spec).expanduser()
    if path.is_dir():
        from slora_jax.model.hf_config import load_model_config
        return load_model_config(path), str(path)
    if spec == "tiny":
        return tiny_llama_config(), None
    name, sep, rest = spec.partition(":")
    if name not in NAMED_SHAPES:
        raise ConfigError(f"--model {spec!r} is neither a checkpoint folder nor a named shape "
                          f"(tiny, {', '.join(NAMED_SHAPES)}; a shape's first N layers: NAME:layers=N)")
    overrides = {}
    # (field, smallest, largest): a vocabulary of fewer than 256 tokens leaves the benchmarks' random prompts
    # (token ids from 3) too few ids to draw from.
    limits = {"layers": ("num_layers", 1, NAMED_SHAPES[name]["num_layers"]),
              "vocab": ("vocab_size", 256, NAMED_SHAPES[name]["vocab_size"])}
    for item in rest.split(",") if sep else ():
        key, _, value = item.partition("=")
        if key not in limits:
            raise ConfigError(f"--model {spec!r}: {key!r} cannot be set (NAME:layers=N[,vocab=V])")
        field, low, high = limits[key]
        if field in overrides:
            raise ConfigError(f"--model {spec!r}: {key} is given twice")
        if not value.isdigit() or not low <= int(value) <= high:
            raise ConfigError(f"--model {spec!r}: {key} must be an integer from {low} to {high}, got {value!r}")
        overrides[field] = int(value)
    if "vocab_size" in overrides:
        # Special tokens past a smaller vocabulary are dropped (random weights: no tokenizer reads them).
        eos = tuple(t for t in NAMED_SHAPES[name]["eos_token_ids"] if t < overrides["vocab_size"])
        bos = NAMED_SHAPES[name].get("bos_token_id")
        overrides.update(eos_token_ids=eos, bos_token_id=bos if bos is not None and bos < overrides["vocab_size"]
                         else None)
    return named_config(name, **overrides), None


class ModelSource:
    """The base weights, made or read once and shared by every engine of a bench run."""

    def __init__(self, spec: str, dtype: str, seed: int = 0):
        self.spec, self.dtype, self.seed = spec, dtype, seed
        self.config, self.model_dir = resolve_model(spec)
        self._params = None

    def params(self):
        if self._params is None:
            if self.model_dir is not None:
                from slora_jax.model.checkpoint import load_params
                self._params = load_params(self.model_dir, self.config, self.dtype)
            else:
                from slora_jax.engine.runner import DTYPES
                from slora_jax.model.init import random_params
                self._params = random_params(self.config, DTYPES[self.dtype], seed=self.seed)
        return self._params

    def engine(self, econf: EngineConfig):
        """A fresh Engine over these weights."""
        from slora_jax.engine.engine import Engine

        tokenizer = None
        if self.model_dir is not None:
            from slora_jax.model.checkpoint import load_tokenizer
            tokenizer = load_tokenizer(self.model_dir)
        return Engine(self.config, self.params(), econf, tokenizer=tokenizer, model_dir=self.model_dir)

    def release(self) -> None:
        self._params = None


def parse_ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--ranks must be comma-separated integers, got {text!r}") from None
    if not ranks or any(r < 1 for r in ranks):
        raise ConfigError(f"--ranks must be positive integers, got {text!r}")
    return ranks


def parse_targets(text: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in str(text).split(",") if t.strip())
    bad = [t for t in targets if t not in MODULES]
    if bad or not targets:
        raise ConfigError(f"--targets must be a comma-separated subset of {', '.join(MODULES)}, got {text!r}")
    return targets


class SyntheticAdapters:
    """Random LoRAs for N adapter names. Adapter i has rank ``ranks[i % len(ranks)]`` and one of
    ``weight_sets`` random weight sets of that rank: names share host copies (thousands of 7B-shaped
    adapters do not fit in host memory otherwise), while each name still gets its own device pages."""

    def __init__(self, cfg: ModelConfig, ranks: Sequence[int], targets: Sequence[str] = DEFAULT_TARGETS,
                 weight_sets: int = 2, seed: int = 0, prefix: str = "lora"):
        if not isinstance(weight_sets, int) or weight_sets < 1:
            raise ConfigError(f"--weight-sets must be a positive integer, got {weight_sets!r}")
        self.cfg, self.ranks, self.targets = cfg, tuple(ranks), tuple(targets)
        self.weight_sets, self.seed, self.prefix = weight_sets, seed, prefix
        self._loras: dict = {}

    def name(self, i: int) -> str:
        return f"{self.prefix}-{i}"

    def weights(self, i: int):
        """The LoraWeights of adapter i (shared by every adapter of the same rank and weight set)."""
        from slora_jax.adapters.synthetic import random_lora

        r = self.ranks[i % len(self.ranks)]
        k = (i // len(self.ranks)) % self.weight_sets
        if (r, k) not in self._loras:
            self._loras[(r, k)] = random_lora(self.cfg, r, self.targets, seed=self.seed * 1000 + r * 17 + k,
                                              name=f"{self.prefix}-r{r}-{k}")
        return self._loras[(r, k)]

    def nbytes(self, i: int, itemsize: int) -> int:
        """Bytes of adapter i's A and B in a pool of ``itemsize``-byte elements (what a step using it reads)."""
        return int(sum((m.a.size + m.b.size) * itemsize for m in self.weights(i).modules.values()))

    def register(self, engine, n: int) -> list[str]:
        """Register adapters 0..n-1 in ``engine`` (those already there are kept); returns their names."""
        names = []
        for i in range(n):
            name = self.name(i)
            if not engine.has_adapter(name):
                engine.load_adapter_weights(name, self.weights(i))
            names.append(name)
        return names

    def by_name(self, names: Sequence[str]) -> dict:
        return {self.name(i): self.weights(i) for i in range(len(names))}


def page_cache(paths) -> int:
    """Read files once so that later reads come from the page cache; returns the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total


def adapter_folders(adapter_dir) -> list[Path]:
    """PEFT adapter folders directly under ``adapter_dir`` (those holding adapter_config.json), sorted."""
    root = Path(adapter_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--adapter-dir {adapter_dir} is not a folder")
    found = sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file())
    if not found:
        raise ConfigError(f"--adapter-dir {adapter_dir} holds no adapter folders (subfolders with adapter_config.json)")
    return found


def register_folders(engine, folders: Sequence[Path], n: int, names: Optional[Sequence[str]] = None) -> list[str]:
    """Register n adapters lazily (config checked now, weights read on first use). Adapter i is folder
    ``i % len(folders)`` under its folder name (suffixed ``-i`` when folders are reused)."""
    out = []
    for i in range(n):
        folder = folders[i % len(folders)]
        name = names[i] if names is not None else (folder.name if i < len(folders) else f"{folder.name}-{i}")
        if not engine.has_adapter(name):
            engine.load_adapter(name, folder, lazy=True)
        out.append(name)
    return out
