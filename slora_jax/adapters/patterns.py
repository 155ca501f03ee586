"""Regular expressions that come from an adapter's config, matched in linear time.

adapter_config.json is untrusted input (a server loads folders users put under its adapter root), and
its target_modules, exclude_modules, layers_pattern, rank_pattern and alpha_pattern are regexes that peft
matches with Python's backtracking ``re``: a pattern such as ``(.*)*(.*)*z`` takes exponential time there,
holding the GIL and so every thread of the process. RE2 matches in time linear in the key's length and
refuses the few constructs that need backtracking (backreferences, lookaround), so such a pattern is
refused with a message naming it instead of stalling the server.

The calls mirror peft's own (``re.fullmatch`` for target/exclude strings, ``re.match`` with a prefix for
layer and rank/alpha patterns); module keys are ASCII without newlines, where RE2 and ``re`` agree on
``$``, ``\\d`` and ``.``.
"""

from __future__ import annotations

import functools

import re2

from slora_jax.errors import AdapterError

# RE2 refuses a pattern whose compiled program would need more memory than this (a huge counted
# repetition such as ``(a{1000}){1000}``); 8 MiB is RE2's own default, far above any real config.
_MAX_PROGRAM_BYTES = 8 << 20


def _options() -> "re2.Options":
    opts = re2.Options()
    opts.max_mem = _MAX_PROGRAM_BYTES
    opts.log_errors = False  # a refused pattern is reported once, as an AdapterError
    return opts


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str):
    return re2.compile(pattern, _options())


def compile_pattern(pattern, what: str):
    """``pattern`` compiled by RE2; AdapterError naming ``what`` and the pattern when it is not a string,
    not a valid regex, or needs a construct RE2 does not support."""
    if not isinstance(pattern, str):
        raise AdapterError(f"{what} must be a regex string, got {pattern!r}")
    try:
        return _compile(pattern)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise AdapterError(f"{what} {pattern!r} is not a valid regex here ({reason}): adapter patterns are "
                           "matched with RE2, which has no backreferences or lookaround") from e


def fullmatch(pattern: str, key: str, what: str = "pattern") -> bool:
    """peft's ``re.fullmatch(pattern, key)``."""
    return compile_pattern(pattern, what).fullmatch(key) is not None


def match(pattern: str, key: str, what: str = "pattern"):
    """peft's ``re.match(pattern, key)``: anchored at the start of ``key``; the match object or None."""
    return compile_pattern(pattern, what).match(key)
