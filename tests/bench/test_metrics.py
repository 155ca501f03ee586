"""Serving metrics on hand-made records, against values worked out by hand."""

import pytest

from slora_jax.bench.metrics import RequestRecord, latency_cdf, satisfaction, summarize


def rec(i, arrival, first, finish, reason, gen, n_out=None):
    return RequestRecord(i, None, 10, n_out or gen, arrival, first, finish, reason, gen)


def test_summary_matches_hand_computation():
    rs = [rec(0, 0.0, 1.0, 4.0, "length", 4),   # latency 4, first token 1
          rec(1, 1.0, 4.0, 9.0, "length", 10),  # latency 8, first token 3
          rec(2, 2.0, 9.0, 10.0, "length", 2),  # latency 8, first token 7 (misses a 6 s SLO)
          rec(3, 3.0, None, 9.5, "abort", 0, 5),
          rec(4, 4.0, None, None, None, 0, 5)]  # unfinished at the time limit
    s = summarize(rs, total_time_s=10.0, slo=6.0)
    assert (s["num_requests"], s["finished"], s["aborted"], s["unfinished"]) == (5, 3, 1, 1)
    assert s["throughput_req_s"] == pytest.approx(0.3)
    assert s["throughput_tok_s"] == pytest.approx(1.6)
    assert s["latency_avg_s"] == pytest.approx(20 / 3)
    assert s["latency_p50_s"] == pytest.approx(8.0)
    assert s["first_token_latency_avg_s"] == pytest.approx(11 / 3)
    assert s["first_token_latency_p50_s"] == pytest.approx(3.0)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    expect = (1 - (1 / 6) ** 2) + (1 - (3 / 6) ** 2)
    assert s["user_satisfaction"] == pytest.approx(expect / 5)
    assert s["per_output_token_latency_avg_s"] == pytest.approx((4 / 4 + 8 / 10 + 8 / 2) / 3)
    x, y = latency_cdf(rs)
    assert x.tolist() == [4.0, 8.0, 8.0] and y.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_satisfaction_curve_and_bad_time():
    assert satisfaction(0.0, 6) == 1.0 and satisfaction(3.0, 6) == pytest.approx(0.75)
    assert satisfaction(6.0, 6) == 0.0 and satisfaction(None, 6) == 0.0
    with pytest.raises(ValueError):
        summarize([], 0.0, 6.0)
