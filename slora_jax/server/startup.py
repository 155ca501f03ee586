"""``slora-jax serve`` before the model loads: every flag that names a file, folder or port is checked first,
so a typo costs one line of error and no minutes of loading.

    sock = preflight(args)        # raises StartupError("--model ...: no config.json"), binds the port
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Sequence


class StartupError(SystemExit):
    """One line for the user: Python prints it to stderr and the process exits with status 1."""

    def __init__(self, message: str):
        super().__init__(f"slora-jax serve: error: {message}")
        self.message = message


def parse_adapter_specs(adapter: Sequence[str], lora_modules: Sequence[str]) -> list[tuple[str, str]]:
    """``--adapter NAME=DIR`` and ``--lora-modules`` in vLLM's two forms (``NAME=DIR`` or
    ``{"name": NAME, "path": DIR}``) -> [(name, dir)]; the same name twice is refused."""
    out: list[tuple[str, str]] = []
    for flag, specs in (("--adapter", adapter), ("--lora-modules", lora_modules)):
        for spec in specs or ():
            spec = spec.strip()
            if flag == "--lora-modules" and spec.startswith("{"):
                try:
                    obj = json.loads(spec)
                except json.JSONDecodeError as e:
                    raise StartupError(f"{flag}: {spec!r} is not valid JSON ({e.msg})")
                if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) \
                        or not isinstance(obj.get("path"), str):
                    raise StartupError(f"{flag}: the JSON form is {{\"name\": NAME, \"path\": DIR}}, got {spec!r}")
                name, path = obj["name"].strip(), obj["path"].strip()
            else:
                name, sep, path = (x.strip() for x in spec.partition("="))
                if not sep:
                    raise StartupError(f"{flag} expects NAME=DIR, got {spec!r}")
            if not name or not path:
                raise StartupError(f"{flag} expects NAME=DIR, got {spec!r}")
            out.append((name, path))
    seen = set()
    for name, _ in out:
        if name in seen:
            raise StartupError(f"adapter name {name!r} is given twice")
        seen.add(name)
    return out


def _folder(flag: str, value: str, must_hold: Sequence[str] = ()) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise StartupError(f"{flag} {value}: no such folder")
    if not path.is_dir():
        raise StartupError(f"{flag} {value}: not a folder")
    for name in must_hold:
        if not (path / name).is_file():
            raise StartupError(f"{flag} {value}: no {name} in this folder")
    return path


def preflight(args, adapters: list[tuple[str, str]]) -> socket.socket:
    """Check the files, folders and numbers that ``args`` names, then bind the port; returns the bound socket.
    Raises StartupError naming the first problem."""
    _folder("--model", args.model, ("config.json",))
    try:
        from slora_jax.model.hf_config import load_model_config

        load_model_config(str(Path(args.model).expanduser()))
    except Exception as e:  # a config.json the loader refuses (unsupported architecture, bad JSON)
        raise StartupError(f"--model {args.model}: {e}".splitlines()[0])
    if args.adapter_root is not None:
        _folder("--adapter-root", args.adapter_root)
    for name, path in adapters:
        _folder(f"adapter {name!r}:", path, ("adapter_config.json",))
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer is not None:
        _folder("--tokenizer", tokenizer, ("tokenizer.json",))
    template = getattr(args, "chat_template", None)
    if template is not None:
        path = Path(template).expanduser()
        if not path.is_file():
            raise StartupError(f"--chat-template {template}: no such file")
        if not (Path(tokenizer or args.model).expanduser() / "tokenizer.json").is_file():
            raise StartupError("--chat-template needs a tokenizer: the model folder has no tokenizer.json "
                               "(give --tokenizer DIR)")
    max_loras, max_cpu = getattr(args, "max_loras", None), getattr(args, "max_cpu_loras", None)
    for flag, v in (("--max-loras", max_loras), ("--max-cpu-loras", max_cpu)):
        if v is not None and v < 1:
            raise StartupError(f"{flag} must be at least 1, got {v}")
    if max_loras is not None and max_cpu is not None and max_cpu < max_loras:
        raise StartupError(f"--max-cpu-loras ({max_cpu}) must be at least --max-loras ({max_loras})")
    return bind(args.host, args.port)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on (host, port), or StartupError (port in use, bad address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = "already in use" if e.errno in (98, 48) else e.strerror or str(e)
        raise StartupError(f"cannot listen on {host}:{port}: {reason} (choose another --port)")
    return sock


def load_tokenizer(args, engine):
    """The server's tokenizer: ``--tokenizer DIR`` or the model's, with ``--chat-template FILE`` over its own
    template; None when there is none."""
    from slora_jax.model.checkpoint import Tokenizer
    from slora_jax.server.text import server_tokenizer

    tokenizer_dir = getattr(args, "tokenizer", None)
    tok = Tokenizer.from_dir(str(Path(tokenizer_dir).expanduser()), engine.model_config) if tokenizer_dir \
        else server_tokenizer(engine)
    template = getattr(args, "chat_template", None)
    if template is not None and tok is not None:
        tok.chat_template = Path(template).expanduser().read_text()
    return tok


def host_cache_bytes(max_cpu_loras: int, model_dir: str, max_lora_rank: int, page_rows: int, dtype: str) -> int:
    """Host memory that holds ``max_cpu_loras`` adapters of the largest shape the engine accepts (rank
    ``max_lora_rank`` on every projection of every layer), in the engine's paged form."""
    from slora_jax.config import MODULES
    from slora_jax.memory.pool import PoolLayout
    from slora_jax.model.checkpoint import numpy_dtype
    from slora_jax.model.hf_config import load_model_config

    cfg = load_model_config(model_dir)
    layout = PoolLayout(cfg.num_layers, 1, page_rows, cfg.kv_size)
    pages = layout.adapter_pages_for([(max_lora_rank, *cfg.module_dims(m)) for m in MODULES])
    itemsize = numpy_dtype(dtype).itemsize if dtype in ("bfloat16", "float16", "float32") else 4  # "auto": at most
    return max_cpu_loras * pages * layout.bytes_per_page(itemsize)

