"""Arrival processes: deterministic by seed, the configured mean rate and shape, and clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from adaptserve.bench.arrivals import (
    BurstyArrivals,
    DiurnalArrivals,
    GammaArrivals,
    TraceArrivals,
    parse_arrivals,
)

NUM = 20_000  # arrivals per statistical check; relative error of a mean rate ~ CV / sqrt(NUM) <= 1.5%

PROCESSES = [
    GammaArrivals(5.0),
    GammaArrivals(5.0, burstiness=0.25),
    BurstyArrivals(on_rate=20.0, off_rate=5.0, on_s=5.0, off_s=5.0),
    DiurnalArrivals(mean_rate=10.0, amplitude=0.8, period_s=20.0),
]


def observed_rate(times: list[float]) -> float:
    """Arrivals per second after the first: (n - 1) gaps over the span."""
    return (len(times) - 1) / (times[-1] - times[0])


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.describe()["name"])
def test_seeded_and_ordered(process):
    times = process.times(500, seed=7)
    assert len(times) == 500
    assert times == process.times(500, seed=7)
    assert times != process.times(500, seed=8)
    assert times[:100] == process.times(100, seed=7)  # a shorter run is a prefix of a longer one
    assert np.all(np.diff(times) >= 0) and times[0] >= 0.0
    assert process.times(0, seed=7) == []
    json.dumps(process.describe(), allow_nan=False)  # plain JSON
    assert process.describe()["rule"]


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_mean_rate_and_cv(burstiness):
    times = GammaArrivals(5.0, burstiness).times(NUM, seed=0)
    assert times[0] == 0.0
    assert observed_rate(times) == pytest.approx(5.0, rel=0.03)
    gaps = np.diff(times)
    # Gamma(k, theta): mean k*theta, std sqrt(k)*theta -> CV 1/sqrt(k): 1, 2, 0.5.
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_gamma_infinite_rate_sends_everything_at_once():
    process = GammaArrivals(math.inf)
    assert process.times(4, seed=0) == [0.0, 0.0, 0.0, 0.0]
    assert process.describe()["rate"] == "inf"


def test_bursty_on_and_off_windows():
    # Per 10 s cycle: 20 * 5 = 100 arrivals on, 5 * 5 = 25 off -> ratio 4, mean 125 / 10 = 12.5/s.
    process = BurstyArrivals(on_rate=20.0, off_rate=5.0, on_s=5.0, off_s=5.0)
    assert process.mean_rate == 12.5
    assert process.rate_at(0.0) == 20.0 and process.rate_at(4.99) == 20.0
    assert process.rate_at(5.0) == 5.0 and process.rate_at(12.0) == 20.0
    times = np.array(process.times(NUM, seed=1))
    is_on = np.mod(times, 10.0) < 5.0
    assert is_on.sum() / (~is_on).sum() == pytest.approx(4.0, rel=0.06)
    assert observed_rate(times.tolist()) == pytest.approx(12.5, rel=0.03)


def test_bursty_off_rate_zero_is_silent_off():
    times = np.array(BurstyArrivals(on_rate=10.0, off_rate=0.0, on_s=2.0, off_s=3.0).times(2000, seed=0))
    assert np.all(np.mod(times, 5.0) < 2.0)


def test_diurnal_upper_half_exceeds_lower_half():
    process = DiurnalArrivals(mean_rate=10.0, amplitude=0.8, period_s=20.0)
    assert process.rate_at(0.0) == pytest.approx(10.0)  # starts at the mean
    assert process.rate_at(5.0) == pytest.approx(18.0)  # peak at a quarter period
    assert process.rate_at(15.0) == pytest.approx(2.0)  # trough at three quarters
    times = np.array(process.times(NUM, seed=2))
    upper = np.mod(times, 20.0) < 10.0  # sin > 0: rising from the mean, peak, back to the mean
    # Integral over each half: mean * P/2 * (1 +- 2a/pi) -> ratio (1 + 1.6/pi) / (1 - 1.6/pi) = 3.075.
    ratio = upper.sum() / (~upper).sum()
    assert ratio == pytest.approx((1 + 1.6 / math.pi) / (1 - 1.6 / math.pi), rel=0.06)
    assert observed_rate(times.tolist()) == pytest.approx(10.0, rel=0.03)


def test_diurnal_zero_amplitude_is_poisson():
    times = DiurnalArrivals(mean_rate=4.0, amplitude=0.0, period_s=10.0).times(NUM, seed=3)
    gaps = np.diff(times)
    assert observed_rate(times) == pytest.approx(4.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


def test_trace_replays_offsets():
    process = TraceArrivals((0.0, 0.5, 0.5, 2.0))
    assert process.times(3, seed=0) == [0.0, 0.5, 0.5]
    assert process.times(3, seed=99) == [0.0, 0.5, 0.5]
    assert process.mean_rate == 1.5  # 3 gaps over 2 s
    with pytest.raises(ValueError, match=r"num must be <= 4"):
        process.times(5, seed=0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GammaArrivals(0.0), "rate must be > 0"),
        (lambda: GammaArrivals(-1.0), "rate must be > 0"),
        (lambda: GammaArrivals(float("nan")), "rate must be > 0"),
        (lambda: GammaArrivals(1.0, burstiness=0.0), "burstiness must be > 0"),
        (lambda: BurstyArrivals(0.0, 1.0, 1.0, 1.0), "on_rate must be > 0"),
        (lambda: BurstyArrivals(1.0, -1.0, 1.0, 1.0), "off_rate must be >= 0"),
        (lambda: BurstyArrivals(1.0, 0.0, 0.0, 1.0), "on_s must be > 0"),
        (lambda: BurstyArrivals(1.0, 0.0, 1.0, -2.0), "off_s must be > 0"),
        (lambda: DiurnalArrivals(0.0, 0.5, 10.0), "mean_rate must be > 0"),
        (lambda: DiurnalArrivals(1.0, 1.5, 10.0), r"amplitude must be in \[0, 1\]"),
        (lambda: DiurnalArrivals(1.0, -0.1, 10.0), r"amplitude must be in \[0, 1\]"),
        (lambda: DiurnalArrivals(1.0, 0.5, 0.0), "period_s must be > 0"),
        (lambda: TraceArrivals(()), "must not be empty"),
        (lambda: TraceArrivals((0.0, 2.0, 1.0)), r"non-decreasing; offsets\[2\]"),
        (lambda: GammaArrivals(1.0).times(-1, seed=0), "num must be >= 0"),
    ],
)
def test_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_parse_gamma_and_poisson():
    assert parse_arrivals("gamma", 3.0, 0.5, {}) == GammaArrivals(3.0, 0.5)
    assert parse_arrivals("poisson", 3.0, 1.0, {}) == GammaArrivals(3.0, 1.0)
    assert parse_arrivals("poisson", math.inf, 1.0, {}).times(2, seed=0) == [0.0, 0.0]


def test_parse_bursty_defaults_keep_the_mean():
    # r = 4, on_s = off_s = 10: on_rate 0.8 * 4 * 20 / 10 = 6.4, off_rate 0.2 * 80 / 10 = 1.6 -> mean 4.
    assert parse_arrivals("bursty", 4.0, 1.0, {}) == BurstyArrivals(6.4, 1.6, 10.0, 10.0)
    # on_s = 5: 60 arrivals per 15 s cycle, 48 on (9.6/s over 5 s), 12 off (1.2/s over 10 s).
    process = parse_arrivals("bursty", 4.0, 1.0, {"on_s": 5})
    assert (process.on_rate, process.off_rate) == (pytest.approx(9.6), pytest.approx(1.2))
    # One rate given: the other is solved for mean 4: off_rate (80 - 6 * 10) / 10 = 2; on_rate 80 / 10 = 8.
    assert parse_arrivals("bursty", 4.0, 1.0, {"on_rate": 6}).off_rate == pytest.approx(2.0)
    assert parse_arrivals("bursty", 4.0, 1.0, {"off_rate": 0}).on_rate == pytest.approx(8.0)
    for options in ({}, {"on_s": 5}, {"on_rate": 6}, {"off_rate": 0}, {"off_s": 2, "on_s": 7}):
        assert parse_arrivals("bursty", 4.0, 1.0, options).mean_rate == pytest.approx(4.0)
    # Both rates given: they win, whatever the mean.
    assert parse_arrivals("bursty", 4.0, 1.0, {"on_rate": 10, "off_rate": 1}).mean_rate == pytest.approx(5.5)


def test_parse_diurnal_defaults():
    assert parse_arrivals("diurnal", 4.0, 1.0, {}) == DiurnalArrivals(4.0, 0.8, 60.0)
    process = parse_arrivals("diurnal", 4.0, 1.0, {"amplitude": 0.3, "period_s": 120})
    assert process == DiurnalArrivals(4.0, 0.3, 120.0)
    assert process.mean_rate == 4.0


@pytest.mark.parametrize(
    ("kind", "rate", "options", "message"),
    [
        ("uniform", 1.0, {}, r"'uniform'.*gamma, poisson, bursty, diurnal"),
        ("gamma", 1.0, {"on_s": 1}, r"'on_s' for gamma.*allowed: none"),
        ("bursty", 1.0, {"period_s": 1}, r"'period_s' for bursty.*on_rate, off_rate, on_s, off_s"),
        ("diurnal", 1.0, {"on_rate": 1}, r"'on_rate' for diurnal.*amplitude, period_s"),
        ("bursty", 4.0, {"on_rate": 10}, r"off_rate=-2.0.*off_rate >= 0"),  # (80 - 100) / 10 < 0
        ("bursty", 4.0, {"off_rate": 10}, r"on_rate=-2.0.*on_rate > 0"),
        ("bursty", math.inf, {}, "request_rate must be > 0 and finite"),
        ("diurnal", 0.0, {}, "request_rate must be > 0"),
        ("bursty", 1.0, {"on_s": 0}, "on_s must be > 0"),
    ],
)
def test_parse_errors(kind, rate, options, message):
    with pytest.raises(ValueError, match=message):
        parse_arrivals(kind, rate, 1.0, options)
