"""The trace summary that says where a device idles: gaps between kernels and waits inside collectives."""

from types import SimpleNamespace as NS

import pytest

from slora_jax.bench import timeline


def _plane(name, streams):
    lines = [NS(name=line, events=[NS(name=n, start_ns=s, duration_ns=d) for n, s, d in evs])
             for line, evs in streams.items()]
    return NS(name=name, lines=lines)


def test_gaps_are_bucketed_and_named_after_the_kernel_that_ends_them():
    evs = [("a", 0, 10_000), ("b", 12_000, 1_000),  # 2 us gap
           ("c", 63_000, 1_000),  # 50 us gap, before c
           ("d", 2_064_000, 1_000)]  # 2 ms gap, before d
    plane = _plane("/device:GPU:0", {"Stream #7(Compute)": evs, "Stream #9(MemcpyH2D)": [("copy", 5_000, 100_000)]})
    s = timeline.summarize([plane])
    dev = s["devices"][0]
    assert dev["span_s"] == pytest.approx(2_065_000 / 1e9)
    assert dev["busy_s"] == pytest.approx(13_000 / 1e9)  # the copy stream is not the compute stream
    assert dev["idle_s"] == pytest.approx((2_000 + 50_000 + 2_000_000) / 1e9)
    n = {(b["lo_us"], b["hi_us"]): b["n"] for b in dev["buckets"]}
    assert n[(0, 5)] == 1 and n[(20, 100)] == 1 and n[(1000, float("inf"))] == 1 and n[(5, 20)] == 0
    assert [g["name"] for g in dev["long_gaps_before"]] == ["d", "c"]
    assert timeline.describe(s)  # printable


def test_overlapping_kernels_leave_no_gap_and_count_once():
    plane = _plane("/device:GPU:0", {"Stream #7(Compute)": [("a", 0, 10_000), ("b", 5_000, 2_000),
                                                            ("c", 10_000, 1_000)],
                                     "Stream #8(Compute)": [("d", 9_000, 4_000)]})  # a second compute stream
    dev = timeline.summarize([plane])["devices"][0]
    assert dev["idle_s"] == 0
    assert dev["span_s"] == pytest.approx(13_000 / 1e9) and dev["busy_s"] == pytest.approx(13_000 / 1e9)


def test_collectives_split_into_waiting_for_the_other_device_and_own_time():
    # Two all-reduces. The first starts at 0 on GPU 0 and 30 us later on GPU 1, both end at 40 us: GPU 0
    # waited 30 us, each did 10 us of its own. The second starts together and takes 5 us.
    g0 = _plane("/device:GPU:0", {"Stream #1(Compute)": [("ncclDevKernel_AllReduce", 0, 40_000), ("k", 41_000, 1_000),
                                                         ("ncclDevKernel_AllReduce", 100_000, 5_000)]})
    g1 = _plane("/device:GPU:1", {"Stream #1(Compute)": [("ncclDevKernel_AllReduce", 30_000, 10_000),
                                                         ("ncclDevKernel_AllReduce", 100_000, 5_000)]})
    host = _plane("/host:CPU", {"thread": [("Execute", 0, 3_000_000), ("Execute", 5_000_000, 1_000_000)]})
    c = timeline.summarize(iter([g0, g1, host]))  # ProfileData gives its planes as an iterator
    coll = c["collectives"]
    assert coll["matched"] == 2 and coll["counts"] == [2, 2]
    assert coll["wait_s"] == pytest.approx([30e-6, 0.0])
    assert coll["after_last_start_s"] == pytest.approx([15e-6, 15e-6])
    assert coll["total_s"] == pytest.approx([45e-6, 15e-6])
    assert coll["skew_us_device1_minus_0"]["p50"] == pytest.approx(15.0)
    assert c["host"] == [dict(name="Execute", n=2, s=pytest.approx(4e-3))]


def test_one_device_has_no_collective_matching():
    g0 = _plane("/device:GPU:0", {"Stream #1(Compute)": [("ncclDevKernel_AllReduce", 0, 40_000)]})
    assert timeline.summarize([g0])["collectives"]["matched"] == 0


def test_unequal_collective_counts_are_not_matched():
    """A collective missing on one device would pair every later one with the wrong one: none is matched."""
    g0 = _plane("/device:GPU:0", {"Stream #1(Compute)": [("ncclDevKernel_AllReduce", 0, 10_000),
                                                         ("ncclDevKernel_AllReduce", 200_000, 10_000),
                                                         ("ncclDevKernel_AllReduce", 400_000, 10_000)]})
    g1 = _plane("/device:GPU:1", {"Stream #1(Compute)": [("ncclDevKernel_AllReduce", 200_000, 10_000),
                                                         ("ncclDevKernel_AllReduce", 400_000, 10_000)]})
    s = timeline.summarize([g1, g0])  # any plane order: devices are taken in name order
    c = s["collectives"]
    assert c["matched"] == 0 and c["counts"] == [3, 2] and c["devices"] == ["/device:GPU:0", "/device:GPU:1"]
    assert any("not matched" in line for line in timeline.describe(s))
    assert not any(line.startswith("host") for line in timeline.describe(s))  # no host events, no host line
