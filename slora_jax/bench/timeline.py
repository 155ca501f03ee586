"""Where a device's time goes between kernels, from a jax.profiler trace (``jax.profiler.ProfileData``).

A stream that idles between kernels waits for something: the host's next launch, or a collective's other
participants. The summary says which, per device:

- ``gaps``: the idle time between consecutive kernels on the compute stream, in buckets by length, and the
  kernels that most often come after the long ones (the first kernel of a step follows a wait on the host);
- ``collectives``: the NCCL kernels of all devices matched in order. Each one ends on every device at about
  the same time, so the device that starts it earlier waits for the later one (``wait_s``); what is left
  after the last device starts (``after_last_start_s``) is the collective's own work.
- ``host``: the host events that take the most time, by name. Nested events each count (a Python caller's time
  includes its callees'), so the top of the list is the outermost frames; launches and transfers follow.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

GAP_BUCKETS_US = (5, 20, 100, 1000)  # [0, 5), [5, 20), [20, 100), [100, 1000), [1000, inf) microseconds
LONG_GAP_US = 20


def _is_collective(name: str) -> bool:
    return "nccl" in name.lower()


def compute_kernels(plane) -> list[tuple[int, int, str]]:
    """(start_ns, end_ns, name) of every kernel on the plane's compute streams, in start order."""
    out = []
    for line in plane.lines:
        if line.name.startswith("Stream") and "Compute" in line.name:
            out.extend((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for ev in line.events)
    out.sort()
    return out


def gap_summary(kernels: list[tuple[int, int, str]], top: int = 8) -> dict:
    """Idle time between consecutive kernels (overlapping kernels count as no gap)."""
    edges = [0, *GAP_BUCKETS_US, float("inf")]
    buckets = [dict(lo_us=lo, hi_us=hi, n=0, s=0.0) for lo, hi in zip(edges[:-1], edges[1:])]
    after = defaultdict(float)
    end = None
    for start, stop, name in kernels:
        if end is not None and start > end:
            gap_us = (start - end) / 1e3
            b = next(b for b in buckets if b["lo_us"] <= gap_us < b["hi_us"])
            b["n"] += 1
            b["s"] += gap_us / 1e6
            if gap_us >= LONG_GAP_US:
                after[name[:80]] += gap_us / 1e6
        end = stop if end is None else max(end, stop)
    span = (max(b for _, b, _ in kernels) - kernels[0][0]) / 1e9 if kernels else 0.0
    busy = _covered_ns(kernels) / 1e9  # overlapping kernels count once: busy + idle = span
    return dict(span_s=span, busy_s=busy, idle_s=sum(b["s"] for b in buckets), buckets=buckets,
                long_gaps_before=[dict(name=k, s=v) for k, v in sorted(after.items(), key=lambda kv: -kv[1])[:top]])


def _covered_ns(kernels) -> int:
    """Nanoseconds covered by at least one of the (start, end, name) intervals, sorted by start."""
    total, end = 0, None
    for start, stop, _ in kernels:
        if end is None or start >= end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def collective_summary(per_device: list[list[tuple[int, int, str]]]) -> dict:
    """The devices' collectives matched by order: how long each device waits for the last one to start. Only
    when every device ran the same number of them: one missing from a device (a trace cut mid-step) would pair
    each later collective with the wrong one."""
    colls = [[k for k in ks if _is_collective(k[2])] for ks in per_device]
    counts = [len(c) for c in colls]
    n = min(counts, default=0)
    if len(colls) < 2 or n == 0:
        return dict(matched=0, counts=counts)
    if len(set(counts)) > 1:
        return dict(matched=0, counts=counts, unmatched="the devices ran different numbers of collectives")
    starts = np.array([[c[i][0] for i in range(n)] for c in colls], dtype=np.float64)
    ends = np.array([[c[i][1] for i in range(n)] for c in colls], dtype=np.float64)
    last_start = starts.max(axis=0)
    wait = (last_start - starts) / 1e9  # [device, collective]
    own = np.clip(ends - last_start, 0, None) / 1e9
    skew_us = (starts[1] - starts[0]) / 1e3
    return dict(matched=n, counts=counts, total_s=[float(x) for x in ((ends - starts) / 1e9).sum(1)],
                wait_s=[float(x) for x in wait.sum(1)], after_last_start_s=[float(x) for x in own.sum(1)],
                after_last_start_median_us=float(np.median(own) * 1e6),
                skew_us_device1_minus_0=dict(p10=float(np.percentile(skew_us, 10)), p50=float(np.median(skew_us)),
                                             p90=float(np.percentile(skew_us, 90))),
                end_spread_median_us=float(np.median((ends.max(0) - ends.min(0)) / 1e3)))


def host_summary(planes, top: int = 15) -> list[dict]:
    """The host events taking the most time, by name (summed over threads)."""
    per = defaultdict(lambda: [0, 0.0])
    for plane in planes:
        if plane.name.startswith("/device"):
            continue
        for line in plane.lines:
            for ev in line.events:
                p = per[ev.name[:80]]
                p[0] += 1
                p[1] += ev.duration_ns / 1e9
    ranked = sorted(per.items(), key=lambda kv: -kv[1][1])[:top]
    return [dict(name=k, n=v[0], s=v[1]) for k, v in ranked]


def summarize(planes) -> dict:
    planes = list(planes)  # ProfileData.planes is an iterator
    gpus = sorted((p for p in planes if p.name.startswith("/device:GPU")), key=lambda p: p.name)
    kernels = [compute_kernels(p) for p in gpus]
    kept = [(p.name, k) for p, k in zip(gpus, kernels) if k]
    # The collectives of every device (one without kernels too: then nothing is matched), in device order, so
    # that the skew is device 1's against device 0's.
    return dict(devices=[dict(plane=name, **gap_summary(k)) for name, k in kept],
                collectives=dict(collective_summary(kernels), devices=[p.name for p in gpus]),
                host=host_summary(planes))


def describe(summary: dict) -> list[str]:
    """A few printable lines."""
    lines = []
    for d in summary.get("devices", []):
        b = ", ".join(f"<{x['hi_us']:g}us {x['s'] * 1e3:.0f}ms/{x['n']}" if x["hi_us"] != float("inf")
                      else f">={x['lo_us']:g}us {x['s'] * 1e3:.0f}ms/{x['n']}" for x in d["buckets"])
        lines.append(f"{d['plane']}: span {d['span_s']:.3f} s, kernels {d['busy_s']:.3f} s, idle {d['idle_s']:.3f} s "
                     f"({b})")
        lines.append("  long gaps before: " + "; ".join(f"{g['name'][:40]} {g['s'] * 1e3:.0f} ms"
                                                         for g in d["long_gaps_before"][:5]))
    c = summary.get("collectives", {})
    if c.get("matched"):
        lines.append(f"collectives: {c['matched']} matched, per device total "
                     + " / ".join(f"{x * 1e3:.0f}" for x in c["total_s"]) + " ms, waiting for the other "
                     + " / ".join(f"{x * 1e3:.0f}" for x in c["wait_s"]) + " ms, after the last start "
                     + " / ".join(f"{x * 1e3:.0f}" for x in c["after_last_start_s"])
                     + f" ms (median {c['after_last_start_median_us']:.1f} us); start skew dev1-dev0 p10/50/90 "
                     f"{c['skew_us_device1_minus_0']['p10']:.0f}/{c['skew_us_device1_minus_0']['p50']:.0f}/"
                     f"{c['skew_us_device1_minus_0']['p90']:.0f} us")
    if c.get("unmatched"):
        lines.append(f"collectives not matched: {c['unmatched']} ({c['counts']})")
    if summary.get("host"):
        lines.append("host: " + "; ".join(f"{h['name'][:40]} {h['s'] * 1e3:.0f} ms/{h['n']}"
                                          for h in summary["host"][:10]))
    return lines
