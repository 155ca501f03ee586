"""Every kernel test runs once per backend: the jitted XLA reference and the Pallas kernel
(compiled on a GPU, interpret mode elsewhere)."""

import numpy as np
import pytest


@pytest.fixture(params=["xla", "pallas"])
def implementation(request):
    return request.param


def _lora_numpy_reference(y, x, case, layer, token_slot):
    """Dense float64 loops: y[t] + scale * (A^T[:r] x[t]) B[:r] per module, from the dense weights."""
    out = np.asarray(y).astype(np.float64).copy()
    x = np.asarray(x).astype(np.float64)
    off = 0
    for m, d_out in enumerate(case.out_sizes):
        for t, s in enumerate(np.asarray(token_slot)):
            if not 0 <= s < case.ranks.shape[0]:  # -1 or out of range: no adapter
                continue
            r = int(case.ranks[s, layer, m])
            if r == 0:
                continue
            a_t = case.a_t[s, m, layer, :r]
            b = case.b[s, m, layer, :r, :d_out]
            out[t, off : off + d_out] += float(case.scales[s, layer, m]) * ((a_t @ x[t]) @ b)
        off += d_out
    return out


@pytest.fixture
def lora_numpy_reference():
    return _lora_numpy_reference
