"""PEFT LoRA adapters: read and validate a folder saved by ``PeftModel.save_pretrained``.

Which modules an adapter targets, and each one's rank and scale, follow peft's own rules
(``check_target_module_exists``, ``get_pattern_key`` and ``LoraLayer.update_layer``): ``target_modules`` as a
list (exact key or ``.suffix`` match, filtered by ``layers_to_transform``/``layers_pattern``), a regex string
(full match) or "all-linear"; ``exclude_modules``; ``rank_pattern``/``alpha_pattern``; ``use_rslora``.
The tensors in adapter_model.safetensors must agree with that config and with the base model.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ml_dtypes
import numpy as np

from slora_jax.adapters import patterns
from slora_jax.config import ATTN_MODULES, MODULES, ModelConfig
from slora_jax.errors import AdapterError
from slora_jax.model.checkpoint import open_safetensors, read_json_object

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# peft's default target_modules for llama / mistral / qwen2 when the config leaves them out.
_DEFAULT_TARGETS = ["q_proj", "v_proj"]
# Options that change what the adapter computes in ways plain LoRA (y += s * x A^T B^T) cannot express.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
}
# These initialisations rewrite the base weights, so the saved A/B only fit that rewritten base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# The largest |alpha/r| accepted. RMSNorm squares the residual stream in float32 (model/llama.py), so an
# update of s * B(Ax) with |B(Ax)| of order one overflows that square to inf (and the next layer's
# output to NaN) once s passes sqrt(float32 max), about 1.8e19: in float32 and bfloat16 alike.
MAX_LORA_SCALE = float(np.finfo(np.float32).max) ** 0.5


def max_lora_scale(dtype="float32") -> float:
    """The largest |alpha/r| accepted for an engine computing in ``dtype``: MAX_LORA_SCALE, or lower where the
    update s * B(Ax), which is added to the projection's output in ``dtype``, overflows first (float16's
    largest value is 65504)."""
    return min(MAX_LORA_SCALE, float(ml_dtypes.finfo(np.dtype(dtype)).max))
_TENSOR = re.compile(r"^(?P<key>(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<block>[^.]+)\.(?P<module>[^.]+))"
                     r"\.lora_(?P<ab>[AB])\.weight$")


@dataclass
class ModuleLora:
    """One projection's LoRA across all layers, host float32, rank padded to the adapter's max rank R."""

    a: np.ndarray  # [L, R, d_in]  = lora_A.weight, zero in layers/rows not adapted
    b: np.ndarray  # [L, R, d_out] = lora_B.weight.T
    ranks: np.ndarray  # [L] int32, 0 where the layer is not adapted
    scales: np.ndarray  # [L] float32, alpha/r (alpha/sqrt(r) with use_rslora), 0 where not adapted


@dataclass
class LoraWeights:
    """A loaded adapter: ``modules`` has a ModuleLora for each projection (config.MODULES names) it adapts."""

    name: str
    path: str
    modules: dict[str, ModuleLora]
    rank: int  # max rank over modules and layers; every ModuleLora is padded to it
    target_modules: tuple[str, ...]  # keys of ``modules``, in MODULES order
    config: dict  # adapter_config.json

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes + m.ranks.nbytes + m.scales.nbytes for m in self.modules.values())


# --------------------------------------------------------------------------------------------- config rules


def _block(module: str) -> str:
    return "self_attn" if module in ATTN_MODULES else "mlp"


def module_key(layer: int, module: str, prefix: str = "model.") -> str:
    """peft's module key of a projection in a *ForCausalLM model, e.g. 'model.layers.3.self_attn.q_proj'."""
    return f"{prefix}layers.{layer}.{_block(module)}.{module}"


def _targets(cfg: dict, key: str) -> bool:
    """peft's ``check_target_module_exists`` for a LoRA config dict and a module key."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if patterns.fullmatch(exclude, key, "exclude_modules"):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            # Every nn.Linear but the output head: in a Llama-family block, the 7 projections.
            return key.rsplit(".", 1)[-1] in MODULES
        return patterns.fullmatch(targets, key, "target_modules")
    if key in targets:
        return True  # an exact key is taken as is, without the layer filter
    found = any(key.endswith(f".{t}") for t in targets)
    indexes = cfg.get("layers_to_transform")
    using_indexes = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if not (using_indexes and found):
        return found
    pattern = cfg.get("layers_pattern")
    match = None
    if not pattern:
        match = patterns.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = patterns.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key, "layers_pattern")
            if match is not None:
                break
    if match is None:
        return False
    layer = int(match.group("idx"))
    return layer == indexes if isinstance(indexes, int) else layer in indexes


def _pattern_value(table: dict, key: str, default, what: str):
    """peft's ``get_pattern_key`` lookup: the first pattern p with re.match(rf"(.*\\.)?({p})$", key) wins."""
    for p in table:
        if patterns.match(rf"(.*\.)?({p})$", key, what):
            return table[p]
    return table.get(key, default)


def _rank_alpha(cfg: dict, key: str) -> tuple[int, float]:
    return (_pattern_value(cfg["rank_pattern"], key, cfg["r"], "rank_pattern key"),
            _pattern_value(cfg["alpha_pattern"], key, cfg["lora_alpha"], "alpha_pattern key"))


def _scale(cfg: dict, rank: int, alpha: float) -> float:
    return alpha / math.sqrt(rank) if cfg.get("use_rslora", False) else alpha / rank


def _check_scale(cfg: dict, key: str, rank: int, alpha: float, dtype) -> float:
    """The module's scale, refused when it is not finite or so large that the adapter's output overflows
    ``dtype``."""
    scale = _scale(cfg, rank, alpha)
    how = f"lora_alpha {alpha!r} / {'sqrt(r)' if cfg.get('use_rslora', False) else 'r'} (r={rank})"
    if not math.isfinite(scale):
        raise AdapterError(f"the scale of {key} is {scale!r} ({how}): it must be a finite number")
    limit = max_lora_scale(dtype)
    if abs(scale) > limit:
        raise AdapterError(f"the scale of {key} is {scale:.3g} ({how}), above the largest this {np.dtype(dtype)} "
                           f"engine accepts ({limit:.3g}): the adapter's output would overflow and every token it "
                           "generates would be garbage")
    return scale


def _check_rank(value, what: str, max_rank: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(f"{what} must be a positive integer, got {value!r}")
    if value > max_rank:
        raise AdapterError(f"{what} is {value}, above the engine's max_lora_rank {max_rank}")
    return value


def _check_alpha(alpha, what: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{what} must be a finite number, got {alpha!r}")
    return alpha


def _check_regex(pattern, what: str) -> None:
    patterns.compile_pattern(pattern, what)


def _normalise(raw: dict) -> dict:
    """Reject what plain LoRA cannot serve; fill peft's defaults. Returns a copy used for the rules above."""
    cfg = dict(raw)
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"peft_type must be 'LORA', got {peft_type!r}")
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if cfg.get(flag):
            raise AdapterError(f"{what} is not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"modules_to_save {cfg['modules_to_save']} is not supported "
                           "(only LoRA on the attention and MLP projections)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"bias={cfg['bias']!r} is not supported (only 'none')")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(f"init_lora_weights={init!r} adapters need the base weights that initialisation "
                           "rewrote; save them with path_initial_model_for_weight_conversion to get plain LoRA")
    if cfg.get("fan_in_fan_out"):
        # peft resets it for nn.Linear targets (all of a Llama block) with this same warning.
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                      "Setting fan_in_fan_out to False.", stacklevel=4)
        cfg["fan_in_fan_out"] = False
    if "r" not in cfg:
        cfg["r"] = 8
    cfg.setdefault("lora_alpha", 8)
    _check_alpha(cfg["lora_alpha"], "lora_alpha")
    for name in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(name) or {}
        if not isinstance(value, dict):
            raise AdapterError(f"{name} must be a dict, got {value!r}")
        for p in value:
            _check_regex(p, f"{name} key")
        cfg[name] = value
    if isinstance(cfg.get("exclude_modules"), str):
        _check_regex(cfg["exclude_modules"], "exclude_modules")
    patterns = cfg.get("layers_pattern")
    for p in [patterns] if isinstance(patterns, str) else (patterns or []):
        _check_regex(p, "layers_pattern")
    targets = cfg.get("target_modules")
    if targets is None:
        targets = _DEFAULT_TARGETS
    if isinstance(targets, str):
        _check_regex(targets, "target_modules")
    elif not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"target_modules must be a list of names or a regex string, got {targets!r}")
    cfg["target_modules"] = targets
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) or
                                   (isinstance(layers, list) and all(isinstance(i, int) for i in layers))):
        raise AdapterError(f"layers_to_transform must be an int or a list of ints, got {layers!r}")
    if isinstance(targets, str) and (layers is not None or cfg.get("layers_pattern")):
        raise AdapterError("layers_to_transform / layers_pattern cannot be used with a regex target_modules")
    return cfg


def _check_folder(adapter_dir) -> Path:
    path = Path(adapter_dir)
    if not path.is_dir():
        raise AdapterError(f"adapter folder {adapter_dir} does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{CONFIG_FILE} is missing from {adapter_dir}")
    if not (path / WEIGHTS_FILE).is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(f"{adapter_dir} has only adapter_model.bin; save the adapter with "
                               "safe_serialization=True to get adapter_model.safetensors")
        raise AdapterError(f"{WEIGHTS_FILE} is missing from {adapter_dir}")
    return path


def _config_targets(cfg: dict, model_config: ModelConfig, prefix: str = "model.") -> dict[tuple[int, str], str]:
    """(layer, module) -> module key, for every projection of the base model that the config targets."""
    return {(i, m): module_key(i, m, prefix) for i in range(model_config.num_layers) for m in MODULES
            if _targets(cfg, module_key(i, m, prefix))}


def read_adapter_config(adapter_dir, model_config: ModelConfig, max_rank: int, dtype="float32") -> dict:
    """Validate a PEFT LoRA folder's adapter_config.json against the base model, the rank limit and the scale
    limit of an engine computing in ``dtype``, without reading the weights. Returns the config dict as saved;
    raises AdapterError saying what is wrong."""
    return _validated_config(adapter_dir, model_config, max_rank, dtype)[0]


def _validated_config(adapter_dir, model_config: ModelConfig, max_rank: int, dtype="float32") -> tuple[dict, dict]:
    """(config as saved, config with peft's defaults filled in)."""
    path = _check_folder(adapter_dir)
    try:
        raw = read_json_object(path / CONFIG_FILE, AdapterError)
    except RecursionError as e:  # json's parser recurses once per nesting level
        raise AdapterError(f"{path / CONFIG_FILE} is nested too deeply to be an adapter config") from e
    cfg = _normalise(raw)
    for key in ("lm_head", "model.embed_tokens"):
        if _targets(cfg, key):
            raise AdapterError(f"target_modules {cfg['target_modules']!r} puts LoRA on {key!r}; only the attention "
                               "and MLP projections are supported")
    targets = _config_targets(cfg, model_config)
    if not targets:
        raise AdapterError(f"target_modules {cfg['target_modules']!r} matches none of the projections "
                           f"{', '.join(MODULES)} of this {model_config.architecture} model")
    for key in targets.values():
        rank, alpha = _rank_alpha(cfg, key)
        _check_rank(rank, f"rank of {key}", max_rank)
        _check_scale(cfg, key, rank, _check_alpha(alpha, f"alpha of {key}"), dtype)
    return raw, cfg


# --------------------------------------------------------------------------------------------- weights


def _parse_tensor_name(name: str, model_config: ModelConfig) -> tuple[str, str, int, str, str]:
    """'base_model.model.<key>.lora_A.weight' -> (key, prefix, layer, module, 'A'|'B')."""
    body = name[len("base_model.model."):] if name.startswith("base_model.model.") else None
    if body is None:
        raise AdapterError(f"unexpected tensor {name!r} (PEFT LoRA tensors start with 'base_model.model.')")
    if "lora_embedding_" in body:
        raise AdapterError(f"tensor {name!r}: LoRA on embeddings is not supported")
    if "lora_magnitude_vector" in body:
        raise AdapterError(f"tensor {name!r}: DoRA is not supported")
    if "modules_to_save" in body:
        raise AdapterError(f"tensor {name!r}: modules_to_save is not supported")
    if ".base_layer." in body:
        raise AdapterError(f"tensor {name!r} is a full base weight saved with the adapter "
                           "(save_embedding_layers); it is not supported")
    m = _TENSOR.match(body)
    if m is None:
        lora = re.match(r"^(.+)\.lora_[AB]\.weight$", body)
        if lora:
            raise AdapterError(f"tensor {name!r}: LoRA on {lora.group(1)!r} is not supported; only the projections "
                               f"{', '.join(MODULES)} of each layer")
        raise AdapterError(f"unexpected tensor {name!r} (not a lora_A/lora_B weight)")
    key, prefix, layer, block, module = m.group("key", "prefix", "layer", "block", "module")
    if module not in MODULES or block != _block(module) or prefix not in ("model.", ""):
        raise AdapterError(f"tensor {name!r}: LoRA on {key!r} is not supported; only the projections "
                           f"{', '.join(MODULES)} of each layer")
    layer = int(layer)
    if layer >= model_config.num_layers:
        raise AdapterError(f"tensor {name!r} is for layer {layer}, but the base model has "
                           f"{model_config.num_layers} layers")
    return key, prefix, layer, module, m.group("ab")


@dataclass
class TensorPair:
    """The lora_A / lora_B tensors of one adapted projection in one layer, as the config and file agree."""

    key: str  # peft's module key, e.g. 'model.layers.3.self_attn.q_proj'
    layer: int
    module: str
    rank: int
    alpha: float
    a: str  # tensor name of lora_A.weight [rank, d_in]
    b: str  # tensor name of lora_B.weight [d_out, rank]


def match_tensors(tensors: dict, cfg: dict, model_config: ModelConfig, max_rank: int,
                  weights_path: Path, targets: Optional[dict] = None) -> list[TensorPair]:
    """Check a weights file's tensors ({name: (dtype tag, shape)}) against the normalised config ``cfg``
    and the base model: every targeted projection has lora_A and lora_B of the config's rank, nothing
    else is there. Returns the pairs in MODULES order, then by layer; raises AdapterError otherwise.
    ``targets``: ``config_ranks(cfg, model_config)`` when already known (it is the costly part)."""
    found: dict[tuple[int, str], dict] = {}
    prefixes = set()
    # LoRA tensors first, so an adapter on lm_head is reported as that, not as its saved base weight.
    for tname in sorted(tensors, key=lambda n: ".lora_" not in n):
        key, prefix, layer, module, ab = _parse_tensor_name(tname, model_config)
        prefixes.add(prefix)
        found.setdefault((layer, module), {"key": key})[ab] = tname
    if not found:
        raise AdapterError(f"{weights_path} holds no LoRA weights")
    if len(prefixes) > 1:
        raise AdapterError(f"{weights_path} mixes module paths {sorted(prefixes)}")
    prefix = prefixes.pop()
    if targets is not None and prefix == "model.":
        expected = {lm: key for lm, (key, _, _) in targets.items()}
    else:
        expected = _config_targets(cfg, model_config, prefix)
    for lm, entry in sorted(found.items()):
        if lm not in expected:
            raise AdapterError(f"{weights_path.name} has LoRA weights for {entry['key']!r}, which "
                               f"{CONFIG_FILE} does not target")
        for ab in "AB":
            if ab not in entry:
                raise AdapterError(f"{weights_path.name} has no lora_{ab} weight for {entry['key']!r}")
    missing = [k for lm, k in expected.items() if lm not in found]
    if missing:
        raise AdapterError(f"{CONFIG_FILE} targets {missing[0]!r} but {weights_path.name} has no weights for it"
                           + (f" (nor for {len(missing) - 1} more)" if len(missing) > 1 else ""))
    pairs = []
    for (layer, module), entry in sorted(found.items(), key=lambda kv: (MODULES.index(kv[0][1]), kv[0][0])):
        key = entry["key"]
        rank, alpha = _rank_alpha(cfg, key) if targets is None else targets[(layer, module)][1:]
        _check_rank(rank, f"rank of {key}", max_rank)
        _check_alpha(alpha, f"alpha of {key}")
        d_in, d_out = model_config.module_dims(module)
        a_shape, b_shape = tuple(tensors[entry["A"]][1]), tuple(tensors[entry["B"]][1])
        if a_shape != (rank, d_in):
            raise AdapterError(f"tensor {entry['A']!r} has shape {list(a_shape)}, expected {[rank, d_in]} "
                               f"(r={rank}, {module} in_features={d_in})")
        if b_shape != (d_out, rank):
            raise AdapterError(f"tensor {entry['B']!r} has shape {list(b_shape)}, expected {[d_out, rank]} "
                               f"({module} out_features={d_out}, r={rank})")
        pairs.append(TensorPair(key, layer, module, rank, alpha, entry["A"], entry["B"]))
    return pairs


def module_scale(cfg: dict, rank: int, alpha: float) -> float:
    """The factor peft multiplies B A x by: alpha/r, or alpha/sqrt(r) with use_rslora."""
    return _scale(cfg, rank, alpha)


def load_peft_adapter(adapter_dir, model_config: ModelConfig, max_rank: int, name: str,
                      dtype="float32") -> LoraWeights:
    """Load and validate a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into host float32.

    Raises AdapterError for anything that is not plain LoRA on the 7 projections, that disagrees with the base
    model (shapes, layer count) or with its own config, a rank above ``max_rank``, a scale whose output
    overflows ``dtype`` (the engine's), non-finite weights, or a truncated/corrupt file."""
    if not isinstance(name, str) or not name:
        raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
    raw, cfg = _validated_config(adapter_dir, model_config, max_rank, dtype)
    path = Path(adapter_dir)
    weights_path = path / WEIGHTS_FILE

    with open_safetensors(weights_path, error=AdapterError) as f:
        pairs = match_tensors(f.tensors, cfg, model_config, max_rank, weights_path)
        max_r = max(p.rank for p in pairs)
        L = model_config.num_layers
        limit = float(ml_dtypes.finfo(np.dtype(dtype)).max)
        modules: dict[str, ModuleLora] = {}
        for p in pairs:
            d_in, d_out = model_config.module_dims(p.module)
            checked = {}
            for tname in (p.a, p.b):
                t = f.get(tname)
                # Checked before the cast to float32, which would turn a float64 past its range into Inf.
                t = np.asarray(t, dtype=np.float64 if t.dtype == np.float64 else np.float32)
                if not np.isfinite(t).all():
                    raise AdapterError(f"tensor {tname!r} has non-finite values (NaN or Inf)")
                if t.size and float(np.abs(t).max()) > limit:  # Inf once stored in the engine's dtype
                    raise AdapterError(f"tensor {tname!r} has values outside {np.dtype(dtype).name}'s range (the "
                                       f"engine's dtype): they would be Inf in the pool")
                checked[tname] = t.astype(np.float32, copy=False)
            a, b = checked[p.a], checked[p.b]
            if p.module not in modules:
                modules[p.module] = ModuleLora(a=np.zeros((L, max_r, d_in), np.float32),
                                               b=np.zeros((L, max_r, d_out), np.float32),
                                               ranks=np.zeros((L,), np.int32), scales=np.zeros((L,), np.float32))
            ml = modules[p.module]
            ml.a[p.layer, :p.rank] = a
            ml.b[p.layer, :p.rank] = b.T
            ml.ranks[p.layer] = p.rank
            ml.scales[p.layer] = _scale(cfg, p.rank, p.alpha)

    targets = tuple(m for m in MODULES if m in modules)
    return LoraWeights(name=name, path=str(path), modules={m: modules[m] for m in targets}, rank=max_r,
                       target_modules=targets, config=raw)


def validated_config(adapter_dir, model_config: ModelConfig, max_rank: int, dtype="float32") -> tuple[dict, dict]:
    """(adapter_config.json as saved, the same with peft's defaults filled in), validated against the base
    model, the rank limit and the scale limit of ``dtype``; AdapterError says what is wrong."""
    return _validated_config(adapter_dir, model_config, max_rank, dtype)


def config_ranks(cfg: dict, model_config: ModelConfig) -> dict[tuple[int, str], tuple[str, int, float]]:
    """(layer, module) -> (module key, rank, alpha) of every projection a normalised config adapts: what the
    weights file must hold, known without reading it."""
    return {lm: (key, *_rank_alpha(cfg, key)) for lm, key in _config_targets(cfg, model_config).items()}
