"""Incremental detokenization and stop strings against one-shot decoding by the `tokenizers` library."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slora_jax.model.checkpoint import Tokenizer
from slora_jax.server.text import ChoiceText
from tests.server.support import write_byte_tokenizer

# Bytes that make every UTF-8 situation: ASCII, lead bytes of 2-4 byte characters, continuation bytes,
# bytes never valid in UTF-8.
BYTES = st.one_of(st.integers(0x20, 0x7E), st.integers(0x80, 0xBF), st.integers(0xC2, 0xF4), st.integers(0xF5, 0xFF),
                  st.sampled_from(list("aé€😀".encode())))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("bytetok")
    write_byte_tokenizer(d)
    return Tokenizer.from_dir(d)


def _run(tok, ids, stop=()):
    text = ChoiceText(tok, stop)
    parts = []
    for t in ids:
        stopped = text.add(t)
        parts.append(text.take(final=False))
        if stopped:
            break
    text.finish()
    parts.append(text.take(final=True))
    return "".join(parts), text.stopped, parts


@settings(max_examples=300, deadline=None, derandomize=True)
@given(ids=st.lists(BYTES, max_size=40))
def test_streamed_text_equals_one_decode(tok, ids):
    streamed, stopped, parts = _run(tok, ids)
    assert streamed == tok.tokenizer.decode(ids)
    assert not stopped


@settings(max_examples=300, deadline=None, derandomize=True)
@given(ids=st.lists(st.sampled_from(list(b"abc") + list("é".encode())), max_size=30),
       stop=st.sampled_from(["ab", "ca", "bca", "é", "aé", "cc", "zz"]))
def test_stop_string_cuts_at_first_occurrence_and_never_streams_its_start(tok, ids, stop):
    full = tok.tokenizer.decode(ids)
    streamed, stopped, parts = _run(tok, ids, [stop])
    assert stopped == (stop in full)
    assert streamed == (full[:full.index(stop)] if stop in full else full)
    # Whatever was streamed before the end is a prefix of the final text.
    sent = ""
    for p in parts[:-1]:
        sent += p
        assert streamed.startswith(sent)
