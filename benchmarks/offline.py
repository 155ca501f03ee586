"""Offline throughput beside the floor of the work that ran: ``slora_jax.bench.offline`` (see its --help)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/bandwidth.py: the copy reference

from slora_jax.bench.offline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
