"""The pinned host reservation: its size rule and its fallback when the allocator refuses (a fake allocator;
the GPU behaviour itself is measured by benchmarks/host_transfer.py)."""

import numpy as np

from slora_jax.memory import pinned


class FakeAllocator:
    """Refuses arrays above ``limit`` bytes; records what was asked for and what is still held."""

    def __init__(self, limit: int):
        self.limit, self.asked, self.live = limit, [], 0

    def put(self, x: np.ndarray):
        self.asked.append(x.nbytes)
        if x.nbytes > self.limit:
            raise RuntimeError(f"RESOURCE_EXHAUSTED: {x.nbytes} bytes of pinned memory")
        return Held(self, x.nbytes)


class Held:
    def __init__(self, alloc: FakeAllocator, n: int):
        self.alloc, self.n = alloc, n
        alloc.live += n

    def block_until_ready(self):
        return self

    def __del__(self):
        self.alloc.live -= self.n


def test_reserve_takes_the_whole_size_in_one_array_and_frees_it():
    a = FakeAllocator(limit=1 << 30)
    got, secs = pinned.reserve(a.put, 64 << 20, min_bytes=1 << 20)
    assert got == 64 << 20 and a.asked == [64 << 20] and secs >= 0
    assert a.live == 0  # nothing is kept: the allocator keeps the room, the tier's arrays take it later


def test_reserve_halves_until_the_allocator_agrees():
    a = FakeAllocator(limit=20 << 20)
    got, _ = pinned.reserve(a.put, 64 << 20, min_bytes=1 << 20)
    assert a.asked == [64 << 20, 32 << 20, 16 << 20] and got == 16 << 20 and a.live == 0


def test_reserve_gives_up_below_the_minimum():
    a = FakeAllocator(limit=0)
    got, _ = pinned.reserve(a.put, 8 << 20, min_bytes=2 << 20)
    assert got == 0 and a.asked == [8 << 20, 4 << 20, 2 << 20]


def test_reservation_is_the_tier_bound_capped_at_a_share_of_the_machine(monkeypatch):
    monkeypatch.setattr(pinned, "physical_memory_bytes", lambda: 128 << 30)
    assert pinned.reservation_bytes(8 << 30) == 8 << 30
    assert pinned.reservation_bytes(80 << 30) == int((128 << 30) * pinned.MAX_SHARE_OF_RAM)
    assert pinned.reservation_bytes(-5) == 0
