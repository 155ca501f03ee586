"""An orbax checkpoint of the converted base weights, so a restart skips safetensors conversion.

``load_params_cached`` returns exactly what ``checkpoint.load_params`` returns (the stacked numpy pytree
in the requested dtype). The first call converts and saves it under ``cache_dir``; later calls restore it
when the entry's key still matches. The key hashes the dtype, the parsed model config and, for every
safetensors file and config.json, its name, size, modification time, safetensors header (tensor names,
dtypes, shapes, offsets) and first and last 64 KiB of data, so rewriting any checkpoint file gives a new
key without reading whole files; a stale entry is never read and is deleted when its replacement is saved.

``load_fused_params_cached`` does the same for the fused weights the engine runs, on the device: its entries
hold the nnx state of the ``Llama`` module (``nnx.state(model)``, by module path), restored straight into
the module's placement.

Entry layout: ``cache_dir/<model name>-<dtype>-<key[:16]>/`` holding ``params/`` (orbax) and
``slora_cache.json`` (the full key and the tree's shapes), written last so that an interrupted save is
never taken for a valid entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

from slora_jax.config import ModelConfig
from slora_jax.errors import ModelError
from slora_jax.model.checkpoint import checkpoint_files, load_params, numpy_dtype, param_shapes

log = logging.getLogger("slora_jax.weights_cache")

CACHE_FORMAT = 1  # bump when the params layout or the entry layout changes
MANIFEST = "slora_cache.json"
_PARAMS = "params"
_MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB
_SAMPLE = 64 << 10


def _safetensors_sample(path: Path) -> bytes:
    """The length prefix and JSON header of a safetensors file (names, dtypes, shapes, offsets), plus the
    first and last ``_SAMPLE`` bytes of its data: a content change keeping size and mtime still shows."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelError(f"corrupt or truncated safetensors file {path}")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER:
            raise ModelError(f"corrupt safetensors file {path}: header of {n} bytes")
        head = f.read(n + _SAMPLE)
        f.seek(max(8 + n, path.stat().st_size - _SAMPLE))
        return prefix + head + f.read(_SAMPLE)


def checkpoint_fingerprint(model_dir, model_config: ModelConfig, dtype: str) -> str:
    """Hex sha256 naming one (checkpoint files, model config, dtype) conversion; see the module docstring."""
    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    extra = [p for p in (model_dir / "config.json", model_dir / "model.safetensors.index.json") if p.is_file()]
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "dtype": dtype, "config": model_config.to_dict()},
                        sort_keys=True, default=str).encode())
    for p in sorted(files + extra):
        st = p.stat()
        h.update(f"\0{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        h.update(_safetensors_sample(p) if p.suffix == ".safetensors" else p.read_bytes())
    return h.hexdigest()


def cache_entry(model_dir, model_config: ModelConfig, dtype: str, cache_dir) -> Path:
    """The folder a cache entry for this checkpoint + dtype has (whether or not it exists yet)."""
    return _entry(cache_dir, model_config, dtype, checkpoint_fingerprint(model_dir, model_config, dtype))


def _entry(cache_dir, model_config: ModelConfig, dtype: str, key: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_config.name or "model").strip("._") or "model"
    return Path(cache_dir).expanduser() / f"{name[:64]}-{dtype}-{key[:16]}"


def _shapes_manifest(model_config: ModelConfig) -> dict:
    shapes = param_shapes(model_config)
    flat = {k: list(v) for k, v in shapes.items() if k != "layers"}
    flat.update({f"layers/{k}": list(v) for k, v in shapes["layers"].items()})
    return flat


def _read_manifest(entry: Path) -> Optional[dict]:
    try:
        data = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_cached(model_dir, model_config: ModelConfig, dtype: str, cache_dir) -> bool:
    """True when ``cache_dir`` holds a complete entry whose key matches the checkpoint as it is now."""
    key = checkpoint_fingerprint(model_dir, model_config, dtype)
    return _valid(_entry(cache_dir, model_config, dtype, key), key, model_config, dtype)


def _valid(entry: Path, key: str, model_config: ModelConfig, dtype: str) -> bool:
    m = _read_manifest(entry)
    return (m is not None and m.get("key") == key and m.get("dtype") == dtype
            and m.get("shapes") == _shapes_manifest(model_config) and (entry / _PARAMS).is_dir())


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _restore(entry: Path, model_config: ModelConfig, dtype: str) -> dict:
    target = numpy_dtype(dtype)
    shapes = param_shapes(model_config)
    # numpy leaves as the target make orbax restore host numpy arrays, as load_params returns.
    abstract = {k: np.empty(s, target) for k, s in shapes.items() if k != "layers"}
    abstract["layers"] = {k: np.empty(s, target) for k, s in shapes["layers"].items()}
    ckpt = _checkpointer()
    try:
        params = ckpt.restore((entry / _PARAMS).absolute(), abstract)
    finally:
        ckpt.close()
    got = _tree_shapes(params)
    if got != _tree_shapes(abstract):
        raise ValueError(f"restored tree {got} does not match the expected shapes")
    return params


def _tree_shapes(tree: dict) -> dict:
    """{key or layers/key: (shape, dtype name)} of a params pytree."""
    out = {k: (tuple(v.shape), str(v.dtype)) for k, v in tree.items() if k != "layers"}
    out.update({f"layers/{k}": (tuple(v.shape), str(v.dtype)) for k, v in tree["layers"].items()})
    return out


def _write_params(tmp: Path, params, manifest: dict) -> None:
    """Save ``params`` (orbax) and ``manifest`` into the new folder ``tmp``, which callers then rename into place:
    a reader never sees an entry half written."""
    tmp.mkdir(parents=True)
    ckpt = _checkpointer()
    try:
        ckpt.save((tmp / _PARAMS).absolute(), params)
        ckpt.wait_until_finished()
    finally:
        ckpt.close()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _save(params: dict, entry: Path, key: str, model_dir, model_config: ModelConfig, dtype: str) -> None:
    tmp = entry.with_name(f"{entry.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        _write_params(tmp, params, {"format": CACHE_FORMAT, "key": key, "dtype": dtype,
                                    "model_dir": str(Path(model_dir).resolve()),
                                    "shapes": _shapes_manifest(model_config)})
        if entry.exists():
            if _valid(entry, key, model_config, dtype):
                return  # another process saved the same entry meanwhile
            shutil.rmtree(entry, ignore_errors=True)  # an incomplete or damaged leftover
        os.replace(tmp, entry)
    except OSError as e:
        if entry.exists() and _valid(entry, key, model_config, dtype):
            return  # another process saved the same entry first
        log.warning("could not save the weights cache to %s: %s", entry, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_stale(cache_dir: Path, keep: Path, model_dir, dtype: str) -> None:
    """Delete other entries made from the same checkpoint folder and dtype (their key no longer matches)."""
    src = str(Path(model_dir).resolve())
    for entry in cache_dir.iterdir():
        if entry == keep or not entry.is_dir():
            continue
        m = _read_manifest(entry)
        if m is not None and m.get("model_dir") == src and m.get("dtype") == dtype:
            log.info("removing stale weights cache %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def load_params_cached(model_dir, model_config: ModelConfig, dtype: str, cache_dir) -> dict:
    """``load_params(model_dir, model_config, dtype)``, restored from ``cache_dir`` when a valid entry for
    this checkpoint and dtype exists, else converted from safetensors and saved there for next time.

    Returns the stacked numpy pytree of ``checkpoint.load_params``. A corrupt entry is converted again and
    replaced; a cache folder that cannot be written only costs the speed-up (logged). Conversion errors
    are ModelError, as from load_params."""
    numpy_dtype(dtype)  # ModelError on a bad dtype before any file is touched
    cache_dir = Path(cache_dir).expanduser()
    key = checkpoint_fingerprint(model_dir, model_config, dtype)
    entry = _entry(cache_dir, model_config, dtype, key)
    if _valid(entry, key, model_config, dtype):
        try:
            return _restore(entry, model_config, dtype)
        except Exception as e:  # orbax/tensorstore raise many types on damaged files; convert again
            log.warning("weights cache %s is unreadable (%s: %s); converting the checkpoint again",
                        entry, type(e).__name__, e)
            shutil.rmtree(entry, ignore_errors=True)
    params = load_params(model_dir, model_config, dtype)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("cannot create the weights cache folder %s: %s", cache_dir, e)
        return params
    _save(params, entry, key, model_dir, model_config, dtype)
    _drop_stale(cache_dir, entry, model_dir, dtype)
    return params


# --------------------------------------------------------------------------------------------- fused, on device

# Bump when device_load's fused layout or the stored state changes. 2: entries hold the nnx state of the
# Llama module (by module path), not the fused pytree.
FUSED_FORMAT = 2


def _fused_key(model_dir, model_config: ModelConfig, dtype: str, scan_layers: bool) -> tuple[str, str]:
    """(cache key, tag naming the layout) of a fused entry."""
    tag = f"{dtype}-fused{FUSED_FORMAT}-{'stacked' if scan_layers else 'unrolled'}"
    key = hashlib.sha256((checkpoint_fingerprint(model_dir, model_config, dtype) + tag).encode()).hexdigest()
    return key, tag


def _params_to_state(params: dict, model_config: ModelConfig, scan_layers: bool) -> dict:
    """The fused pytree (arrays, or ShapeDtypeStructs for a restore target) as the nnx state of the
    ``Llama`` holding it, a nested dict by module path (``layers/attn/wqkv``): what the cache stores."""
    from flax import nnx

    from slora_jax.model.llama import from_params

    return _string_keys(nnx.state(from_params(params, model_config, scan_layers=scan_layers)).to_pure_dict())


def _state_to_params(state: dict, abstract: dict, model_config: ModelConfig, scan_layers: bool) -> dict:
    """A restored nnx state back into the model, and the model's fused pytree (its own arrays)."""
    from flax import nnx

    from slora_jax.model.llama import from_params

    model = from_params(abstract, model_config, scan_layers=scan_layers)
    graphdef, target = nnx.split(model)
    nnx.replace_by_pure_dict(target, _int_keys(state))
    return nnx.merge(graphdef, target).params()


def _string_keys(tree):
    """Orbax names entries by path: the unrolled model's layer indices become strings."""
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _int_keys(tree):
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


def _abstract_manifest(abstract) -> dict:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {jax.tree_util.keystr(p): list(a.shape) for p, a in leaves}


def load_fused_params_cached(model_dir, model_config: ModelConfig, dtype: str, cache_dir, scan_layers: bool = True,
                             device=None, mesh=None, workers: Optional[int] = None,
                             via_pinned_host: Optional[bool] = None) -> dict:
    """``device_load.load_fused_params`` with an orbax cache of its result: a valid entry is restored
    straight onto the device (or mesh) in the fused layout, ready to compile; otherwise the checkpoint is
    loaded and the entry saved for the next start. A damaged entry is loaded again and replaced; a cache
    folder that cannot be written only costs the speed-up (logged)."""
    from slora_jax.model.device_load import fused_abstract, load_fused_params

    numpy_dtype(dtype)
    cache_dir = Path(cache_dir).expanduser()
    key, tag = _fused_key(model_dir, model_config, dtype, scan_layers)
    entry = _entry(cache_dir, model_config, tag, key)
    abstract = fused_abstract(model_config, dtype, scan_layers, device, mesh)
    shapes = _abstract_manifest(abstract)
    manifest = _read_manifest(entry)
    if (manifest is not None and manifest.get("key") == key and manifest.get("shapes") == shapes
            and (entry / _PARAMS).is_dir()):
        ckpt = _checkpointer()
        try:
            return _state_to_params(ckpt.restore((entry / _PARAMS).absolute(), _params_to_state(abstract, model_config,
                                                                                                scan_layers)),
                                    abstract, model_config, scan_layers)
        except Exception as e:  # orbax/tensorstore raise many types on damaged files; load again
            log.warning("weights cache %s is unreadable (%s: %s); loading the checkpoint again",
                        entry, type(e).__name__, e)
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            ckpt.close()
    params = load_fused_params(model_dir, model_config, dtype, scan_layers, device, mesh, workers, via_pinned_host)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("cannot create the weights cache folder %s: %s", cache_dir, e)
        return params
    tmp = entry.with_name(f"{entry.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        _write_params(tmp, _params_to_state(params, model_config, scan_layers), {
                                    "format": CACHE_FORMAT, "key": key, "dtype": tag,
                                    "model_dir": str(Path(model_dir).resolve()), "shapes": shapes})
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
        _drop_stale(cache_dir, entry, model_dir, tag)
    except OSError as e:
        log.warning("could not save the weights cache to %s: %s", entry, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return params
