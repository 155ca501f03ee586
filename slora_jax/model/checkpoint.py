"""Base checkpoint loading: Hugging Face safetensors -> a stacked numpy pytree, plus the tokenizer.

The pytree (``load_params``) is what the model code consumes:

    {"embed": [V, H],
     "layers": {"attn_norm": [L, H], "wq": [L, H, Nq*D], "wk": [L, H, Nkv*D], "wv": [L, H, Nkv*D],
                "wo": [L, Nq*D, H], "bq": [L, Nq*D], "bk": [L, Nkv*D], "bv": [L, Nkv*D] (attention_bias only),
                "mlp_norm": [L, H], "w_gate": [L, H, I], "w_up": [L, H, I], "w_down": [L, I, H]},
     "final_norm": [H],
     "lm_head": [H, V]}  (absent with tie_word_embeddings: logits = h @ embed.T)

Linear weights are stored as [in, out] (HF keeps [out, in]) so the model computes ``x @ W``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np
from safetensors import SafetensorError, safe_open

from slora_jax.config import ModelConfig
from slora_jax.errors import ModelError

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
# safetensors dtype tags this loader reads; anything else (int, fp8, ...) is refused by name.
SAFETENSORS_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def numpy_dtype(dtype: str) -> np.dtype:
    """'bfloat16' | 'float16' | 'float32' -> numpy dtype (bfloat16 from ml_dtypes)."""
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# --------------------------------------------------------------------------------------------- safetensors


class TensorInfo(NamedTuple):
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]


class SafetensorsFile:
    """One open .safetensors file whose failures (missing, truncated, corrupt, odd dtype) raise ``error``."""

    def __init__(self, handle, path: Path, error: type[Exception]):
        self._f, self.path, self._error = handle, path, error
        self.tensors: dict[str, TensorInfo] = {}
        for name in handle.keys():
            s = handle.get_slice(name)
            self.tensors[name] = TensorInfo(str(s.get_dtype()), tuple(int(d) for d in s.get_shape()))

    def get(self, name: str) -> np.ndarray:
        """The tensor as stored (float tags only; BF16 comes back as ml_dtypes.bfloat16)."""
        info = self.tensors[name]
        if info.dtype not in SAFETENSORS_FLOAT_DTYPES:
            raise self._error(f"tensor {name!r} in {self.path.name} has unsupported dtype {info.dtype} "
                              f"(supported: {', '.join(sorted(SAFETENSORS_FLOAT_DTYPES))})")
        try:
            return self._f.get_tensor(name)
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            raise self._error(f"cannot read tensor {name!r} from {self.path}: {e}") from e


@contextlib.contextmanager
def open_safetensors(path, error: type[Exception] = ModelError) -> Iterator[SafetensorsFile]:
    """Open a safetensors file for tensor-by-tensor numpy reads (memory-mapped by the library)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"missing safetensors file {path}")
    try:
        handle = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"corrupt or truncated safetensors file {path}: {e}") from e
    with handle:
        yield SafetensorsFile(handle, path, error)


class TensorSpan(NamedTuple):
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the tensor's data in the file
    end: int


# safetensors float tags -> numpy dtypes (BF16 from ml_dtypes).
SAFETENSORS_NUMPY = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                     "BF16": np.dtype(ml_dtypes.bfloat16)}
_HEADER_MAX = 100 << 20  # safetensors' own cap on the JSON header


def read_safetensors_header(fileobj, path, error: type[Exception] = ModelError) -> dict[str, TensorSpan]:
    """{tensor name: TensorSpan} from an open safetensors file, checked against the file's size (a truncated
    or corrupt file raises ``error`` here, before any data is read). Only the header is read."""
    size = os.fstat(fileobj.fileno()).st_size
    prefix = os.pread(fileobj.fileno(), 8, 0)
    if len(prefix) < 8:
        raise error(f"corrupt or truncated safetensors file {path}: {size} bytes")
    (n,) = struct.unpack("<Q", prefix)
    if n > _HEADER_MAX or 8 + n > size:
        raise error(f"corrupt or truncated safetensors file {path}: header of {n} bytes in a file of {size}")
    try:
        header = json.loads(os.pread(fileobj.fileno(), n, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"corrupt safetensors file {path}: unreadable header ({e})") from e
    if not isinstance(header, dict):
        raise error(f"corrupt safetensors file {path}: the header is not a JSON object")
    base = 8 + n
    out: dict[str, TensorSpan] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError) as e:
            raise error(f"corrupt safetensors file {path}: bad header entry for {name!r}") from e
        item = SAFETENSORS_NUMPY[dtype].itemsize if dtype in SAFETENSORS_NUMPY else None
        if not 0 <= start <= end or base + end > size or (
                item is not None and end - start != item * math.prod(shape)):
            raise error(f"corrupt or truncated safetensors file {path}: tensor {name!r} lies at bytes "
                        f"{base + start}..{base + end} of a file of {size}")
        out[name] = TensorSpan(dtype, shape, base + start, base + end)
    return out


def pread_into(fd: int, buf: memoryview, offset: int, path, error: type[Exception] = ModelError) -> None:
    """Fill ``buf`` with the file's bytes from ``offset`` (the GIL is released while the kernel copies).
    A file that got shorter since its header was read raises ``error``, where a memory map would crash
    the process with SIGBUS."""
    done, want = 0, len(buf)
    while done < want:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise error(f"{path} ended at byte {offset + done} while reading it (truncated or replaced?)")
        done += got


# --------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class TensorSlot:
    """Where one HF tensor goes: params[group][key][layer] (or params[key] at top level)."""

    key: str
    layer: Optional[int]
    hf_shape: tuple[int, ...]
    transpose: bool


def tensor_slots(config: ModelConfig) -> dict[str, TensorSlot]:
    """HF tensor name -> where it goes in the load_params pytree, for every tensor the model needs."""
    h, i, q, kv, v = (config.hidden_size, config.intermediate_size, config.q_size, config.kv_size,
                      config.vocab_size)
    out = {"model.embed_tokens.weight": TensorSlot("embed", None, (v, h), False),
           "model.norm.weight": TensorSlot("final_norm", None, (h,), False)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = TensorSlot("lm_head", None, (v, h), True)
    per_layer = {
        "input_layernorm.weight": ("attn_norm", (h,), False),
        "self_attn.q_proj.weight": ("wq", (q, h), True),
        "self_attn.k_proj.weight": ("wk", (kv, h), True),
        "self_attn.v_proj.weight": ("wv", (kv, h), True),
        "self_attn.o_proj.weight": ("wo", (h, q), True),
        "post_attention_layernorm.weight": ("mlp_norm", (h,), False),
        "mlp.gate_proj.weight": ("w_gate", (i, h), True),
        "mlp.up_proj.weight": ("w_up", (i, h), True),
        "mlp.down_proj.weight": ("w_down", (h, i), True),
    }
    if config.attention_bias:
        per_layer.update({"self_attn.q_proj.bias": ("bq", (q,), False),
                          "self_attn.k_proj.bias": ("bk", (kv,), False),
                          "self_attn.v_proj.bias": ("bv", (kv,), False)})
    for layer in range(config.num_layers):
        for suffix, (key, shape, transpose) in per_layer.items():
            out[f"model.layers.{layer}.{suffix}"] = TensorSlot(key, layer, shape, transpose)
    return out


def param_shapes(config: ModelConfig) -> dict:
    """The load_params pytree with shape tuples in place of arrays."""
    layers, top = {}, {}
    for slot in tensor_slots(config).values():
        shape = slot.hf_shape[::-1] if slot.transpose else slot.hf_shape
        if slot.layer is None:
            top[slot.key] = shape
        else:
            layers[slot.key] = (config.num_layers,) + shape
    return {**top, "layers": layers}


def estimate_param_bytes(config: ModelConfig, dtype: str) -> int:
    """Bytes of the load_params pytree in ``dtype``."""
    item = numpy_dtype(dtype).itemsize
    shapes = param_shapes(config)
    total = sum(int(np.prod(s)) for k, s in shapes.items() if k != "layers")
    total += sum(int(np.prod(s)) for s in shapes["layers"].values())
    return total * item


# --------------------------------------------------------------------------------------------- files


def read_json_object(path: Path, error: type[Exception] = ModelError) -> dict:
    """A JSON file that must hold an object; anything else raises ``error`` naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    return data


def checkpoint_files(model_dir) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, else model.safetensors, else
    every ``*.safetensors`` in the folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist")
    index = model_dir / _INDEX
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index} has no weight_map")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise ModelError(f"{index.name} references shard {shard!r}, which is not in {model_dir}")
        return [model_dir / s for s in shards]
    if (model_dir / _SINGLE).is_file():
        return [model_dir / _SINGLE]
    # "consolidated" files are Mistral's own format, with other tensor names.
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        bins = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt*"))
        hint = f" (found {', '.join(bins)}; convert it to safetensors)" if bins else ""
        raise ModelError(f"no *.safetensors weights in {model_dir}{hint}")
    return files


def _tensor_index(files: list[Path]) -> dict[str, tuple[Path, TensorInfo]]:
    where: dict[str, tuple[Path, TensorInfo]] = {}
    for path in files:
        with open_safetensors(path) as f:
            for name, info in f.tensors.items():
                if name in where:
                    raise ModelError(f"tensor {name!r} appears in both {where[name][0].name} and {path.name}")
                where[name] = (path, info)
    return where


# --------------------------------------------------------------------------------------------- loading


def check_tensors(model_dir, config: ModelConfig, slots: dict, where: dict) -> None:
    """Raise ModelError unless the checkpoint's tensors (``where``: name -> (file, info with dtype and
    shape)) are exactly the ones ``slots`` needs, with their shapes and a float dtype."""
    missing = [n for n in slots if n not in where]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(f"checkpoint in {model_dir} is missing tensor {missing[0]!r}{more}")
    # An untied head saved next to tied embeddings is ignored, as transformers ties it anyway.
    unexpected = [n for n in where if n not in slots and not _IGNORED.match(n)
                  and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if unexpected:
        raise ModelError(f"checkpoint has tensors this {config.architecture} config does not use: "
                         f"{', '.join(sorted(unexpected)[:5])}")
    for name, slot in slots.items():
        info = where[name][1]
        if info.shape != slot.hf_shape:
            raise ModelError(f"tensor {name!r} has shape {list(info.shape)}, expected {list(slot.hf_shape)}")
        if info.dtype not in SAFETENSORS_FLOAT_DTYPES:
            raise ModelError(f"tensor {name!r} has unsupported dtype {info.dtype}")


def tensor_spans(files: list[Path]) -> dict[str, tuple[Path, TensorSpan]]:
    """name -> (file, TensorSpan) over a checkpoint's files, from their headers alone."""
    where: dict[str, tuple[Path, TensorSpan]] = {}
    for path in files:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise ModelError(f"cannot open {path}: {e}") from e
        with f:
            for name, span in read_safetensors_header(f, path).items():
                if name in where:
                    raise ModelError(f"tensor {name!r} appears in both {where[name][0].name} and {path.name}")
                where[name] = (path, span)
    return where



def load_params(model_dir, config: ModelConfig, dtype: str) -> dict:
    """Read a HF Llama/Mistral/Qwen2 safetensors checkpoint into the stacked layout (module docstring), cast
    to ``dtype`` ('bfloat16' | 'float16' | 'float32').

    Tensors are streamed one at a time into preallocated stacked arrays, so host memory peaks near one copy
    of the weights in ``dtype``. Raises ModelError naming any missing, unexpected, misshapen or unreadable
    tensor or file."""
    target = numpy_dtype(dtype)
    slots = tensor_slots(config)
    where = _tensor_index(checkpoint_files(model_dir))
    check_tensors(model_dir, config, slots, where)

    shapes = param_shapes(config)
    params: dict = {k: np.empty(s, target) for k, s in shapes.items() if k != "layers"}
    params["layers"] = {k: np.empty(s, target) for k, s in shapes["layers"].items()}
    by_file: dict[Path, list[str]] = {}
    for name in slots:
        by_file.setdefault(where[name][0], []).append(name)
    for path, names in by_file.items():
        with open_safetensors(path) as f:
            for name in names:
                slot = slots[name]
                value = f.get(name)
                if slot.transpose:
                    value = value.T
                dest = params[slot.key] if slot.layer is None else params["layers"][slot.key][slot.layer]
                # Element-wise cast on assignment (round-to-nearest-even, as torch's .to()).
                dest[...] = value
                del value
    return params


# --------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(model_dir):
    """``tokenizers.Tokenizer`` from ``model_dir/tokenizer.json``, or None when the folder has none."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception on bad files
        raise ModelError(f"cannot read {path}: {e}") from e


def _token_content(token) -> Optional[str]:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


class Tokenizer:
    """Text <-> token ids, plus the end-of-sequence ids and chat template of a checkpoint folder."""

    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...] = (), bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, chat_template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, model_dir, config: Optional[ModelConfig] = None) -> Optional["Tokenizer"]:
        """None when ``model_dir`` has no tokenizer.json. EOS ids are the config's plus tokenizer_config's."""
        tok = load_tokenizer(model_dir)
        if tok is None:
            return None
        tc_path = Path(model_dir) / "tokenizer_config.json"
        tc = read_json_object(tc_path) if tc_path.is_file() else {}
        bos, eos = _token_content(tc.get("bos_token")), _token_content(tc.get("eos_token"))
        eos_ids = list(config.eos_token_ids) if config is not None else []
        if eos is not None and tok.token_to_id(eos) is not None and tok.token_to_id(eos) not in eos_ids:
            eos_ids.append(tok.token_to_id(eos))
        template = tc.get("chat_template")
        jinja = Path(model_dir) / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        elif isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(tok, tuple(eos_ids), bos, eos, template if isinstance(template, str) else None)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Apply the chat template (Jinja, sandboxed) to OpenAI-style messages."""
        if self.chat_template is None:
            raise ModelError("this tokenizer has no chat template")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")
