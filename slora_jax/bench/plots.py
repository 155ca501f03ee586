"""PNG plots of a bench result: throughput against the number of adapters, and latency CDFs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def plot_results(results: dict, cdfs: dict, out_png) -> Optional[Path]:
    """Two panels: (left) throughput (req/s) vs number of adapters for each S-LoRA configuration, with
    the baselines as horizontal lines; (right) the latency and first-token latency CDF of every run.

    ``results``: the bench JSON (``runs`` list). ``cdfs``: run label -> {"latency": (x, y),
    "first_token_latency": (x, y)}. Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = results.get("runs", [])
    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict = {}
    for r in runs:
        if r["backend"] == "slora":
            key = f"S-LoRA ({r.get('kernel_backend')}, {r.get('scheduler')}, ranks {r.get('ranks_label')})"
            series.setdefault(key, []).append((r["num_adapters"], r["throughput_req_s"]))
    for key, pts in series.items():
        pts.sort()
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    styles = {"base": ":", "merged": "--", "peft": "-."}
    for r in runs:
        if r["backend"] in styles:
            label = f"{r['backend']}" + (f" n={r['num_adapters']}" if r["backend"] == "peft" else "")
            ax_t.axhline(r["throughput_req_s"], linestyle=styles[r["backend"]], color="gray", label=label)
    ax_t.set_xlabel("number of adapters")
    if any(len(p) > 1 and min(x for x, _ in p) > 0 for p in series.values()):
        ax_t.set_xscale("log")
    ax_t.set_ylim(bottom=0)  # ratios read true against a zero baseline
    ax_t.set_ylabel("throughput (requests/s)")
    ax_t.set_title("Throughput")
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    for label, c in cdfs.items():
        x, y = c.get("latency", ((), ()))
        if len(x):
            line, = ax_c.plot(x, y, label=f"{label} latency")
            fx, fy = c.get("first_token_latency", ((), ()))
            if len(fx):
                ax_c.plot(fx, fy, linestyle="--", color=line.get_color(), label=f"{label} first token")
    slo = next((r.get("slo_s") for r in runs if r.get("slo_s")), None)
    if slo:
        ax_c.axvline(slo, color="red", alpha=0.5, linewidth=1, label=f"SLO {slo:g} s")
    ax_c.set_xlabel("seconds")
    ax_c.set_ylabel("share of finished requests")
    ax_c.set_title("Latency CDF")
    ax_c.grid(alpha=0.3)
    ax_c.legend(fontsize=6)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
