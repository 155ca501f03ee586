"""Runtime adapter loading is confined to one folder: resolve a requested path and refuse escapes."""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Optional

from slora_jax.server.errors import APIError, bad_request


def adapter_root(root: Optional[str]) -> Optional[Path]:
    """The resolved ``--adapter-root`` (must be an existing folder), or None when runtime loading is off."""
    if root is None:
        return None
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"--adapter-root {root!r} is not an existing folder")
    return path


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_adapter_path(root: Optional[Path], requested: str) -> Path:
    """The adapter folder ``requested`` names, resolved (symlinks followed) and checked to lie in ``root``.

    Relative paths are taken from ``root``. Refused (APIError 400/403) when no root is configured, when the
    path has a ``..`` part or a NUL, when it resolves outside ``root`` (403 whether or not it exists), when
    it does not exist or is not a folder (400), or when any file in the folder is a link that leads outside
    ``root``."""
    if root is None:
        raise APIError(403, "runtime adapter loading is disabled: start the server with --adapter-root DIR",
                       "permission_error", "adapter_loading_disabled", "lora_path")
    if "\x00" in requested:
        raise bad_request("lora_path contains a NUL character", "lora_path")
    if ".." in PurePath(requested).parts or ".." in requested.replace("\\", "/").split("/"):
        raise _escape(requested)
    candidate = Path(requested).expanduser()
    if not candidate.is_absolute():
        candidate = root / candidate
    # Confinement is decided before existence, so that a path outside the root gets the same answer
    # whether or not it exists there (the answer must not probe the server's file system). Links that
    # exist are followed; a dangling one is judged by where it points.
    try:
        resolved = candidate.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop
        raise bad_request(f"adapter folder {requested!r} does not exist under the adapter root", "lora_path")
    if not _inside(resolved, root):
        raise _escape(requested)
    if not resolved.exists():
        raise bad_request(f"adapter folder {requested!r} does not exist under the adapter root", "lora_path")
    if not resolved.is_dir():
        raise bad_request(f"adapter path {requested!r} is not a folder", "lora_path")
    # The loader opens files in the folder by name: a link among them must not lead out either.
    with os.scandir(resolved) as entries:
        for entry in entries:
            try:
                target = Path(entry.path).resolve(strict=True)
            except (OSError, RuntimeError):
                continue  # a dangling link reads as a missing file
            if not _inside(target, root):
                raise _escape(requested)
    return resolved


def _escape(requested: str) -> APIError:
    return APIError(403, f"adapter path {requested!r} is outside the adapter root", "permission_error",
                    "path_outside_adapter_root", "lora_path")
