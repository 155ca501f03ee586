"""Run a notebook's code cells in order, as one script, where no Jupyter kernel is installed (the GPU machine).

    python benchmarks/run_notebook.py notebooks/03_train_and_serve.ipynb --out $OUT/notebook03.json

Cells share one namespace, as in a kernel; figures go to matplotlib's Agg backend (saved beside --out as
PNGs, one per figure that a cell showed). The JSON holds device, jax version, date, command and each cell's
seconds, and the error and the cell that raised it if one did (exit status 1 then). The notebook's own
checks (its asserts) are what "works" means here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    nb = json.loads(Path(args.notebook).read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]

    import matplotlib.pyplot as plt

    figures = []

    def show(*_a, **_k):  # a cell's plt.show(): keep the figure as a file instead
        for num in plt.get_fignums():
            path = out.with_name(f"{out.stem}-figure{len(figures) + 1}.png")
            plt.figure(num).savefig(path, dpi=80)
            figures.append(path.name)
        plt.close("all")

    plt.show = show
    namespace = {"__name__": "__main__"}
    record = {"notebook": args.notebook, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cells": []}
    status = 0
    for i, source in enumerate(cells):
        t0 = time.perf_counter()
        try:
            exec(compile(source, f"{args.notebook}#cell{i}", "exec"), namespace)
        except BaseException as e:  # the failing cell and why, then stop as a kernel run would
            record["cells"].append({"cell": i, "seconds": time.perf_counter() - t0, "ok": False})
            record["error"] = {"cell": i, "type": type(e).__name__, "message": str(e)[:2000],
                               "traceback": traceback.format_exc()[-4000:]}
            status = 1
            break
        record["cells"].append({"cell": i, "seconds": time.perf_counter() - t0, "ok": True})
        sys.stdout.flush()
    import jax

    record.update(jax_version=jax.__version__, device=str(jax.devices()[0].device_kind),
                  backend=jax.default_backend(), figures=figures, ok=status == 0)
    out.write_text(json.dumps(record, indent=1))
    print(f"{args.notebook}: {'ok' if status == 0 else 'FAILED in cell %d' % record['error']['cell']}, "
          f"{sum(c['seconds'] for c in record['cells']):.1f} s over {len(record['cells'])} cells", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
