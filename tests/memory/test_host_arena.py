"""The host tier's arena: first-fit blocks that coalesce when freed, no block reused while an upload from it may
still be reading it, memory committed block by block (or whole and registered, as on a GPU), and the failures
that leave the host tier to private copies instead."""

import errno
import logging
import os

import numpy as np
import pytest

from slora_jax.memory import host_arena
from slora_jax.memory.host_arena import ALIGN, HostArena


class Upload:
    """A device array whose copy from the host completes when the test says so."""

    def __init__(self):
        self.done = False
        self.waited = 0

    def is_ready(self):
        return self.done

    def block_until_ready(self):
        self.waited += 1
        self.done = True
        return self


def test_blocks_are_first_fit_aligned_and_coalesce():
    arena = HostArena(8 * ALIGN)
    a, b, c = arena.alloc(1), arena.alloc(ALIGN + 1), arena.alloc(3 * ALIGN)
    assert (a.offset, a.size) == (0, ALIGN) and (b.offset, b.size) == (ALIGN, 2 * ALIGN)
    assert (c.offset, c.size) == (3 * ALIGN, 3 * ALIGN) and arena.used_bytes == 6 * ALIGN
    assert arena.alloc(3 * ALIGN) is None  # 2 blocks' room left, at the end
    arena.free(b)
    assert arena.largest_free == 2 * ALIGN and arena.alloc(3 * ALIGN) is None  # two runs of 2, not adjacent
    arena.free(a)  # merges with b's run: 3 at the start
    d = arena.alloc(3 * ALIGN)
    assert (d.offset, d.size) == (0, 3 * ALIGN)
    for blk in (c, d):
        arena.free(blk)
    assert arena.used_bytes == 0 and arena.largest_free == 8 * ALIGN  # one run again
    arena.close()


def test_a_block_is_not_reused_while_an_upload_from_it_may_be_reading_it():
    arena = HostArena(2 * ALIGN)
    blk = arena.alloc(2 * ALIGN)
    up = Upload()
    arena.note_transfer(blk, up)
    arena.free(blk)
    assert arena.alloc(ALIGN) is None  # the upload has not completed
    up.done = True
    again = arena.alloc(2 * ALIGN)
    assert again is not None and again.offset == 0
    # wait_deferred waits for such uploads, so that a reader can take the room
    slow = Upload()
    arena.note_transfer(again, slow)
    arena.free(again)
    assert arena.wait_deferred() and slow.waited == 1 and arena.alloc(2 * ALIGN) is not None
    assert not arena.wait_deferred()  # nothing left to wait for
    arena.close()


def test_finished_uploads_are_not_kept_on_the_block():
    arena = HostArena(ALIGN)
    blk = arena.alloc(ALIGN)
    ups = [Upload() for _ in range(5)]
    for up in ups:
        arena.note_transfer(blk, up)
        up.done = True
    assert len(blk.pending) == 1  # only the last one, the others had completed when it was noted
    arena.close()


def test_blocks_are_views_of_one_shared_memory_seen_by_another_mapping():
    arena = HostArena(4 * ALIGN)
    blk = arena.alloc(100)
    view = arena.view(blk, 100)
    view[:] = np.arange(100, dtype=np.uint8)
    assert np.shares_memory(view, arena.buffer)
    import mmap
    other = np.frombuffer(mmap.mmap(arena.fd, arena.size), np.uint8)  # as a reader process maps the fd
    np.testing.assert_array_equal(other[blk.offset:blk.offset + 100], np.arange(100, dtype=np.uint8))
    arena.close()


def test_registered_arena_is_committed_whole_and_unregistered_at_close(monkeypatch):
    calls, committed = [], []
    real = os.posix_fallocate
    monkeypatch.setattr(host_arena.os, "posix_fallocate", lambda fd, off, n: (committed.append((off, n)),
                                                                            real(fd, off, n)))
    arena = HostArena(4 * ALIGN, register=lambda ptr, n: calls.append(("map", ptr, n)),
                      unregister=lambda ptr: calls.append(("unmap", ptr)))
    assert arena.registered and committed == [(0, 4 * ALIGN)]
    ptr = arena.buffer.ctypes.data
    assert calls == [("map", ptr, 4 * ALIGN)]
    arena.alloc(ALIGN)
    assert committed == [(0, 4 * ALIGN)]  # blocks of a committed arena commit nothing more
    arena.close()
    assert calls[-1] == ("unmap", ptr)
    arena.close()  # once only
    assert len(calls) == 2


def test_an_unregistered_arena_commits_each_block_as_it_is_handed_out(monkeypatch, caplog):
    arena = HostArena(4 * ALIGN)
    committed = []
    monkeypatch.setattr(host_arena.os, "posix_fallocate", lambda fd, off, n: committed.append((off, n)))
    a = arena.alloc(ALIGN)
    arena.alloc(2 * ALIGN)
    assert committed == [(0, ALIGN), (ALIGN, 2 * ALIGN)]

    def full(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(host_arena.os, "posix_fallocate", full)
    with caplog.at_level(logging.WARNING, logger="slora_jax.memory"):
        assert arena.alloc(ALIGN) is None  # no memory to back it: refused now, not a SIGBUS at the write
    assert "could not commit" in caplog.text and "No space left" in caplog.text
    assert arena.used_bytes == 3 * ALIGN and arena.largest_free == ALIGN  # nothing was taken
    arena.free(a)
    arena.close()


def test_an_arena_that_cannot_be_made_says_why(caplog):
    def refuse(ptr, n):
        raise RuntimeError("INTERNAL: cuMemHostRegister failed")

    with caplog.at_level(logging.WARNING, logger="slora_jax.memory"):
        assert HostArena.create(ALIGN, register=refuse) is None
    assert "private copies" in caplog.text and "cuMemHostRegister failed" in caplog.text


def test_alloc_of_nothing_or_more_than_the_arena():
    arena = HostArena(ALIGN)
    assert arena.alloc(2 * ALIGN) is None
    blk = arena.alloc(0)
    assert blk is not None and blk.size == ALIGN
    arena.close()


@pytest.mark.parametrize("seed", [0, 1])
def test_random_alloc_free_never_overlaps_and_accounts_exactly(seed):
    rng = np.random.default_rng(seed)
    arena = HostArena(64 * ALIGN)
    live = []
    for _ in range(400):
        if live and rng.random() < 0.45:
            arena.free(live.pop(int(rng.integers(len(live)))))
        else:
            blk = arena.alloc(int(rng.integers(1, 6 * ALIGN)))
            if blk is not None:
                live.append(blk)
        spans = sorted((b.offset, b.offset + b.size) for b in live)
        assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:]))  # no two blocks overlap
        assert arena.used_bytes == sum(b.size for b in live)
        assert all(e <= arena.size for _, e in spans)
    for b in live:
        arena.free(b)
    assert arena.largest_free == arena.size
    arena.close()
