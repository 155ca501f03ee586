"""``slora-jax serve`` options for the server's limits, lifecycle and adapter state (kept apart from the
engine's options in slora_jax.cli). Imports nothing heavy: the CLI builds its parser from it."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

# name -> (default, type, metavar, help). A run_server namespace built by hand may leave any of them out.
SERVING_LIMITS = {
    "state_file": (None, str, "PATH", "record adapters loaded and unloaded at runtime in this JSON file and load "
                   "them again at the next start (needs --adapter-root); without it they are gone after a restart"),
    "drain_timeout": (30.0, float, "S", "on SIGTERM/SIGINT stop accepting and give the requests in flight this "
                      "long to finish; those still running then end with an error (streams: an error event, "
                      "then [DONE])"),
    "request_timeout": (None, float, "S", "end a request that runs longer with a 504 (streams: an error event); "
                        "default: no deadline"),
    "header_timeout": (10.0, float, "S", "close a connection whose request headers take longer (408)"),
    "body_timeout": (30.0, float, "S", "answer 408 to a request whose body takes longer after its headers"),
    "keep_alive_timeout": (5.0, float, "S", "close an idle kept-alive connection after this long"),
    "max_connections": (1024, int, "N", "open connections beyond this are answered 503 and closed"),
    "stall_timeout": (300.0, float, "S", "/live and /health answer 503 'stalled' when the engine has not finished "
                      "a step for this long (a step that compiles can take minutes on a large model)"),
}


def add_serving_limits(parser: argparse.ArgumentParser) -> None:
    for name, (default, type_, metavar, text) in SERVING_LIMITS.items():
        shown = "" if default is None else f" (default: {default:g})" if isinstance(default, float) \
            else f" (default: {default})"
        parser.add_argument("--" + name.replace("_", "-"), type=type_, default=default, metavar=metavar,
                            help=text + shown)


def serving_limits(args) -> SimpleNamespace:
    """The options above from ``args``, defaults filled in for any it lacks (0 turns a limit off)."""
    values = {name: getattr(args, name, default) for name, (default, *_rest) in SERVING_LIMITS.items()}
    for name in ("request_timeout", "header_timeout", "body_timeout", "max_connections"):
        if values[name] is not None and values[name] <= 0:
            values[name] = None
    return SimpleNamespace(**values)
