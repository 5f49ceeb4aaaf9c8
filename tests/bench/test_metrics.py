"""Benchmark metric math against numbers worked out by hand, following vLLM's `vllm bench serve`."""

from __future__ import annotations

import math

import pytest

from adaptserve.bench.metrics import (
    RequestOutcome,
    calculate_metrics,
    format_summary,
    max_concurrent_requests,
    parse_goodput,
    parse_percentiles,
)

approx = pytest.approx


def three_requests() -> list[RequestOutcome]:
    """A: 4 tokens, B: 3 tokens, C: 2 tokens; each ITL gap is that request's TPOT."""
    return [
        RequestOutcome(True, 10, ttft=0.1, itl=[0.1, 0.1, 0.1], latency=0.4, output_tokens=4, start_time=0.0),
        RequestOutcome(True, 20, ttft=0.2, itl=[0.2, 0.2], latency=0.6, output_tokens=3, start_time=0.1),
        RequestOutcome(True, 30, ttft=0.6, itl=[0.3], latency=0.9, output_tokens=2, start_time=0.3),
    ]


def test_three_requests_by_hand():
    # Duration: first dispatch 0.0 to last completion 0.3 + 0.9 = 1.2 s.
    m = calculate_metrics(three_requests(), duration_s=1.2)
    assert m["duration"] == 1.2
    assert (m["completed"], m["failed"]) == (3, 0)
    assert m["total_input_tokens"] == 60  # 10 + 20 + 30
    assert m["total_output_tokens"] == 9  # 4 + 3 + 2
    assert m["request_throughput"] == approx(2.5)  # 3 / 1.2
    assert m["output_throughput"] == approx(7.5)  # 9 / 1.2
    assert m["total_token_throughput"] == approx(57.5)  # 69 / 1.2
    assert m["request_goodput"] is None  # no SLOs given

    # TTFT [0.1, 0.2, 0.6]: mean 0.3; median 0.2; deviations -0.2, -0.1, 0.3 -> var 0.14 / 3,
    # std sqrt(0.046667) = 0.216025; p99 at rank 0.99 * 2 = 1.98 -> 0.2 + 0.98 * 0.4 = 0.592; p90 -> 0.52.
    assert m["mean_ttft_ms"] == approx(300.0)
    assert m["median_ttft_ms"] == approx(200.0)
    assert m["std_ttft_ms"] == approx(216.025, abs=1e-3)
    assert m["p99_ttft_ms"] == approx(592.0)
    assert m["p90_ttft_ms"] == approx(520.0)
    assert m["p50_ttft_ms"] == approx(200.0)

    # TPOT: A (0.4 - 0.1) / 3 = 0.1, B (0.6 - 0.2) / 2 = 0.2, C (0.9 - 0.6) / 1 = 0.3.
    # mean 0.2, median 0.2, std sqrt(0.02 / 3) = 0.0816497; p99: 0.2 + 0.98 * 0.1 = 0.298.
    assert m["mean_tpot_ms"] == approx(200.0)
    assert m["median_tpot_ms"] == approx(200.0)
    assert m["std_tpot_ms"] == approx(81.6497, abs=1e-3)
    assert m["p99_tpot_ms"] == approx(298.0)

    # ITL, flat: [0.1, 0.1, 0.1, 0.2, 0.2, 0.3]: mean 1.0 / 6 = 0.166667; median (0.1 + 0.2) / 2 = 0.15;
    # squared deviations 3 * (1/15)^2 + 2 * (1/30)^2 + (2/15)^2 = 1/30 -> var 1/180, std 0.0745356;
    # p99 at rank 0.99 * 5 = 4.95 -> 0.2 + 0.95 * 0.1 = 0.295.
    assert m["mean_itl_ms"] == approx(166.6667, abs=1e-3)
    assert m["median_itl_ms"] == approx(150.0)
    assert m["std_itl_ms"] == approx(74.5356, abs=1e-3)
    assert m["p99_itl_ms"] == approx(295.0)

    # E2EL [0.4, 0.6, 0.9]: mean 1.9 / 3 = 0.633333; median 0.6; squared deviations
    # 0.054444 + 0.001111 + 0.071111 = 0.126667 -> var 0.042222, std 0.205480; p99: 0.6 + 0.98 * 0.3 = 0.894.
    assert m["mean_e2el_ms"] == approx(633.3333, abs=1e-3)
    assert m["median_e2el_ms"] == approx(600.0)
    assert m["std_e2el_ms"] == approx(205.480, abs=1e-3)
    assert m["p99_e2el_ms"] == approx(894.0)

    # In flight: A [0, 0.4), B [0.1, 0.7), C [0.3, 1.2) -> all three during [0.3, 0.4).
    assert m["max_concurrent_requests"] == 3
    assert m["ttfts"] == [0.1, 0.2, 0.6]
    assert m["e2els"] == [0.4, 0.6, 0.9]
    assert m["itls"] == [[0.1, 0.1, 0.1], [0.2, 0.2], [0.3]]
    assert m["input_lens"] == [10, 20, 30]
    assert m["output_lens"] == [4, 3, 2]
    assert m["start_times"] == [0.0, 0.1, 0.3]
    assert m["errors"] == ["", "", ""]


def test_one_token_output_is_left_out_of_tpot_but_meets_a_tpot_slo():
    outcomes = [
        RequestOutcome(True, 5, ttft=0.05, itl=[], latency=0.05, output_tokens=1),
        # TPOT (0.5 - 0.1) / 4 = 0.1 s: over a 50 ms SLO.
        RequestOutcome(True, 5, ttft=0.1, itl=[0.1] * 4, latency=0.5, output_tokens=5),
    ]
    m = calculate_metrics(outcomes, duration_s=2.0, goodput_slos_ms={"tpot": 50})
    assert m["mean_tpot_ms"] == approx(100.0)  # the second request alone
    assert m["median_tpot_ms"] == approx(100.0)
    assert m["std_tpot_ms"] == approx(0.0)
    assert m["itls"] == [[], [0.1] * 4]  # the 1-token request has no gaps
    assert m["mean_itl_ms"] == approx(100.0)
    assert m["request_goodput"] == approx(0.5)  # only the 1-token request (TPOT 0) is good: 1 / 2 s
    assert m["total_output_tokens"] == 6


def test_multi_token_chunks_use_usage_for_tpot():
    # usage says 10 tokens in 3 chunks: 2 ITL gaps, TPOT (0.55 - 0.1) / (10 - 1) = 0.05 s.
    outcome = RequestOutcome(True, 8, ttft=0.1, itl=[0.2, 0.25], latency=0.55, output_tokens=10)
    m = calculate_metrics([outcome], duration_s=1.0)
    assert m["mean_tpot_ms"] == approx(50.0)
    assert m["mean_itl_ms"] == approx(225.0)  # (0.2 + 0.25) / 2
    assert m["total_output_tokens"] == 10
    assert m["output_throughput"] == approx(10.0)


def test_output_tokens_none_falls_back_to_one_token_per_chunk():
    # 3 gaps -> 4 chunks -> 4 tokens; TPOT (0.4 - 0.1) / 3 = 0.1 s.
    outcome = RequestOutcome(True, 8, ttft=0.1, itl=[0.1, 0.1, 0.1], latency=0.4, output_tokens=None)
    m = calculate_metrics([outcome], duration_s=0.5)
    assert m["total_output_tokens"] == 4
    assert m["output_lens"] == [4]
    assert m["mean_tpot_ms"] == approx(100.0)
    assert m["output_throughput"] == approx(8.0)  # 4 / 0.5


def test_failed_requests_count_only_as_failed():
    failed = RequestOutcome(False, 100, ttft=9.0, itl=[9.0], latency=9.0, output_tokens=50, error="boom")
    m = calculate_metrics([*three_requests(), failed], duration_s=1.2)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["total_input_tokens"] == 60  # the failed request's 100 prompt tokens are not counted
    assert m["total_output_tokens"] == 9  # and it generated 0
    assert m["request_throughput"] == approx(2.5)
    assert m["mean_ttft_ms"] == approx(300.0)  # the same stats as without it
    assert m["p99_itl_ms"] == approx(295.0)
    assert m["mean_e2el_ms"] == approx(633.3333, abs=1e-3)
    assert m["input_lens"] == [10, 20, 30, 100]
    assert m["output_lens"] == [4, 3, 2, 0]
    assert m["errors"] == ["", "", "", "boom"]
    assert len(m["ttfts"]) == len(m["itls"]) == len(m["e2els"]) == 3


def test_all_failed_gives_zeros():
    outcomes = [RequestOutcome(False, 10, error="refused"), RequestOutcome(False, 20, error="refused")]
    m = calculate_metrics(outcomes, duration_s=3.0, percentiles=(50, 99.9), goodput_slos_ms={"ttft": 100})
    assert (m["completed"], m["failed"]) == (0, 2)
    assert m["total_input_tokens"] == m["total_output_tokens"] == 0
    assert m["request_throughput"] == m["output_throughput"] == m["total_token_throughput"] == 0.0
    assert m["request_goodput"] == 0.0
    assert m["max_concurrent_requests"] == 0
    stat_keys = [k for k in m if k.endswith("_ms")]
    assert len(stat_keys) == 4 * 5  # 4 metrics x (mean, median, std, p50, p99.9)
    for key in stat_keys:
        assert m[key] == 0.0 and not math.isnan(m[key]), key


def goodput_case() -> list[RequestOutcome]:
    """SLOs ttft 200 ms, tpot 100 ms, e2el 1000 ms: each of the last three breaks exactly one."""
    return [
        RequestOutcome(True, 1, ttft=0.1, latency=0.3, output_tokens=5),  # tpot 0.05: good
        RequestOutcome(True, 1, ttft=0.3, latency=0.5, output_tokens=5),  # ttft 0.3 > 0.2
        RequestOutcome(True, 1, ttft=0.1, latency=0.9, output_tokens=5),  # tpot 0.8 / 4 = 0.2 > 0.1
        RequestOutcome(True, 1, ttft=0.1, latency=1.5, output_tokens=40),  # e2el 1.5 > 1.0 (tpot 0.036)
        RequestOutcome(False, 1, error="x"),  # failed: never good
    ]


@pytest.mark.parametrize(
    ("slos_ms", "expected"),
    [
        ({"ttft": 200, "tpot": 100, "e2el": 1000}, 0.5),  # 1 good / 2 s
        ({"ttft": 200}, 1.5),  # 3 good / 2 s
        ({"tpot": 100}, 1.5),
        ({"e2el": 1000}, 1.5),
        ({"ttft": 100}, 1.5),  # ttft == slo (0.1 <= 0.1) passes
    ],
)
def test_goodput_each_slo_rejects_its_request(slos_ms, expected):
    m = calculate_metrics(goodput_case(), duration_s=2.0, goodput_slos_ms=slos_ms)
    assert m["request_goodput"] == approx(expected)


def test_empty_slos_mean_no_goodput():
    assert calculate_metrics(goodput_case(), duration_s=2.0, goodput_slos_ms={})["request_goodput"] is None


def test_percentile_key_names():
    m = calculate_metrics(three_requests(), 1.2, percentile_metrics=("itl",), percentiles=(25.5, 50, 99.9))
    p_keys = sorted(k for k in m if k.startswith("p") and k.endswith("_ms"))
    assert p_keys == ["p25.5_itl_ms", "p50_itl_ms", "p99.9_itl_ms"]
    assert "mean_ttft_ms" not in m
    # ITL sorted [0.1, 0.1, 0.1, 0.2, 0.2, 0.3]: p99.9 rank 4.995 -> 0.2 + 0.995 * 0.1 = 0.2995;
    # p25.5 rank 1.275 -> 0.1.
    assert m["p99.9_itl_ms"] == approx(299.5)
    assert m["p25.5_itl_ms"] == approx(100.0)


def test_max_concurrent_requests():
    outcomes = [
        RequestOutcome(True, 1, latency=1.0, start_time=0.0),  # [0, 1)
        RequestOutcome(True, 1, latency=1.0, start_time=0.5),  # [0.5, 1.5)
        RequestOutcome(True, 1, latency=0.1, start_time=0.6),  # [0.6, 0.7): three in flight
        RequestOutcome(True, 1, latency=1.0, start_time=1.5),  # starts as the 2nd ends: no overlap
        RequestOutcome(False, 1, latency=5.0, start_time=0.0),  # failed: not counted
    ]
    assert max_concurrent_requests(outcomes) == 3
    assert max_concurrent_requests(outcomes[:2]) == 2
    back_to_back = [RequestOutcome(True, 1, latency=1.0, start_time=float(i)) for i in range(3)]
    assert max_concurrent_requests(back_to_back) == 1


@pytest.mark.parametrize("duration_s", [0.0, -1.0, float("nan")])
def test_bad_duration(duration_s):
    with pytest.raises(ValueError, match="duration_s must be > 0"):
        calculate_metrics(three_requests(), duration_s)


def test_bad_metric_names():
    with pytest.raises(ValueError, match=r"'foo'.*ttft, tpot, itl, e2el"):
        calculate_metrics(three_requests(), 1.0, percentile_metrics=("ttft", "foo"))
    with pytest.raises(ValueError, match=r"itl.*ttft, tpot, e2el"):
        calculate_metrics(three_requests(), 1.0, goodput_slos_ms={"itl": 10})
    with pytest.raises(ValueError, match="0 < p <= 100"):
        calculate_metrics(three_requests(), 1.0, percentiles=(0,))


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_goodput(["e2el:1.5e3"]) == {"e2el": 1500.0}
    assert parse_goodput([]) == {}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("itl:5", r"'itl:5'.*allowed: ttft, tpot, e2el"),
        ("ttft500", r"'ttft500'.*metric:ms"),
        ("ttft:fast", r"'ttft:fast'.*'fast' is not a number"),
        ("ttft:0", r"'ttft:0'.*must be > 0"),
        ("tpot:-5", r"'tpot:-5'.*must be > 0"),
        ("tpot:nan", r"'tpot:nan'.*must be > 0"),
    ],
)
def test_parse_goodput_errors(item, message):
    with pytest.raises(ValueError, match=message):
        parse_goodput([item])


def test_parse_goodput_refuses_a_repeated_metric():
    with pytest.raises(ValueError, match="given twice"):
        parse_goodput(["ttft:1", "ttft:2"])


def test_parse_percentiles():
    assert parse_percentiles("50,90,99") == [50.0, 90.0, 99.0]
    assert parse_percentiles(" 99.9 , 100") == [99.9, 100.0]


@pytest.mark.parametrize("text, bad", [("50,0", "'0'"), ("50,101", "'101'"), ("50,x", "'x'"), ("50,", "''")])
def test_parse_percentiles_errors(text, bad):
    with pytest.raises(ValueError, match=f"{bad}.*0 < p <= 100"):
        parse_percentiles(text)


def test_format_summary():
    m = calculate_metrics(three_requests(), 1.2, goodput_slos_ms={"ttft": 200})
    text = format_summary(m, "Serving Benchmark Result")
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert "Successful requests:                     3" in lines
    assert "Failed requests:                         0" in lines
    assert "Benchmark duration (s):                  1.20" in lines
    assert "Total input tokens:                      60" in lines
    assert "Total generated tokens:                  9" in lines
    assert "Request throughput (req/s):              2.50" in lines
    assert "Request goodput (req/s):                 1.67" in lines  # A, B good: 2 / 1.2
    assert "Output token throughput (tok/s):         7.50" in lines
    assert "Total token throughput (tok/s):          57.50" in lines
    assert "---------------Time to First Token----------------" in lines
    assert "Mean TTFT (ms):                          300.00" in lines
    assert "P99 E2EL (ms):                           894.00" in lines
    assert "Median ITL (ms):                         150.00" in lines
    assert "Request goodput" not in format_summary(calculate_metrics(three_requests(), 1.2), "x")
