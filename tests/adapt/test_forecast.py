"""HoltWinters on synthetic series: a daily sine is learned within two days, a weekly pattern within
weeks, a step is followed, a constant stays constant, and the same input gives the same forecast."""

import numpy as np
import pytest

from adaptserve.adapt.forecast import (
    DAILY,
    DAY_S,
    ArrivalForecaster,
    HoltWinters,
    histogram_quantile,
)
from adaptserve.adapt.knobs import Knobs
from adaptserve.adapt.snapshot import TelemetrySnapshot

STEP_S = 10.0
HOUR_S = 3600.0


def daily_sine(t):
    return 20.0 + 10.0 * np.sin(2 * np.pi * np.asarray(t) / DAY_S)


def feed(forecaster, series, start, end, noise=0.0, seed=0, step_s=STEP_S):
    rng = np.random.default_rng(seed)
    for t in np.arange(start, end, step_s):
        forecaster.observe(float(t), float(series(t)) + (rng.normal(0.0, noise) if noise else 0.0))


def next_hour(now):
    return now + np.arange(1, int(HOUR_S / STEP_S) + 1) * STEP_S


def test_daily_sine_next_hour_after_two_days():
    forecaster = HoltWinters()
    feed(forecaster, daily_sine, 0.0, 2 * DAY_S, noise=0.3)
    for start in (2 * DAY_S, 2 * DAY_S + 6 * HOUR_S, 2 * DAY_S + 15 * HOUR_S):  # rise, peak, fall
        if start > forecaster.last_time:
            feed(forecaster, daily_sine, forecaster.last_time + STEP_S, start, noise=0.3, seed=int(start))
        times = next_hour(forecaster.last_time)
        error = np.abs(forecaster.forecast_path(times) - daily_sine(times))
        assert error.mean() < 0.5 and error.max() < 1.0, (start, error.mean(), error.max())
    # the last value held flat would be off by up to 2.6 over the hour at the steepest point
    now = 2 * DAY_S
    assert np.abs(daily_sine(now) - daily_sine(next_hour(now))).max() > 2.5


def test_no_season_before_a_whole_period():
    forecaster = HoltWinters()
    feed(forecaster, daily_sine, 0.0, 0.9 * DAY_S)
    assert not any(season.active for season in forecaster.seasons)
    feed(forecaster, daily_sine, 0.9 * DAY_S, 1.01 * DAY_S)
    assert forecaster.seasons[0].active and not forecaster.seasons[1].active


def test_short_history_forecasts_level_and_trend():
    forecaster = HoltWinters()
    for i in range(60):  # a ramp of 0.5 per step for ten minutes
        forecaster.observe(i * STEP_S, 5.0 + 0.5 * i)
    now = forecaster.last_time
    assert forecaster.forecast(now) == pytest.approx(5.0 + 0.5 * 59, abs=1.5)
    assert forecaster.forecast(now + 300) > forecaster.forecast(now) + 2.0  # the ramp goes on
    assert forecaster.forecast_max(now, 300) == pytest.approx(forecaster.forecast(now + 300))


def test_step_change_is_tracked():
    forecaster = HoltWinters()
    step_at = 6 * HOUR_S
    feed(forecaster, lambda t: 10.0 if t < step_at else 50.0, 0.0, step_at + 5 * 60)
    assert forecaster.forecast(forecaster.last_time + 300) > 40.0  # most of the way in five minutes
    feed(forecaster, lambda t: 50.0, step_at + 5 * 60, step_at + 30 * 60)
    for ahead in (0.0, 300.0, HOUR_S):
        assert forecaster.forecast(forecaster.last_time + ahead) == pytest.approx(50.0, rel=0.02)


def test_constant_series_forecasts_the_constant():
    forecaster = HoltWinters()
    feed(forecaster, lambda t: 7.0, 0.0, 2.5 * DAY_S)
    assert forecaster.seasons[0].active
    times = forecaster.last_time + np.array([0.0, 60.0, HOUR_S, DAY_S, 3 * DAY_S])
    np.testing.assert_allclose(forecaster.forecast_path(times), 7.0, atol=1e-9)


def test_weekly_pattern_is_learned():
    def weekly(t):
        day = (np.asarray(t) // DAY_S) % 7
        return 20.0 + 5.0 * np.sin(2 * np.pi * np.asarray(t) / DAY_S) + np.where(day >= 5, -8.0, 0.0)

    errors = {}
    for name, seasons in (("daily", (DAILY,)), ("daily+weekly", None)):
        options = {} if seasons is None else {"seasons": seasons}
        forecaster = HoltWinters(step_s=60.0, **options)  # a coarser cadence keeps the test fast
        end = 19 * DAY_S  # the next day is a weekend day
        feed(forecaster, weekly, 0.0, end, noise=0.5, step_s=60.0)
        times = end + np.arange(0, 61) * 60.0
        errors[name] = np.abs(forecaster.forecast_path(times) - weekly(times)).mean()
    assert errors["daily+weekly"] < 1.0 < 5.0 < errors["daily"]


def test_deterministic():
    runs = []
    for _ in range(2):
        forecaster = HoltWinters()
        feed(forecaster, daily_sine, 0.0, 1.2 * DAY_S, noise=2.0, seed=3)
        runs.append(forecaster.forecast_path(next_hour(forecaster.last_time)))
    assert np.array_equal(runs[0], runs[1])


def test_time_must_not_go_back_and_empty_forecasts_zero():
    forecaster = HoltWinters()
    assert forecaster.forecast(100.0) == 0.0
    forecaster.observe(100.0, 3.0)
    with pytest.raises(ValueError, match="before the last one"):
        forecaster.observe(50.0, 3.0)
    with pytest.raises(ValueError, match="alpha"):
        HoltWinters(alpha=0.0)


def test_histogram_quantile():
    histogram = {1: 10, 4: 80, 9: 10}
    assert histogram_quantile(histogram, 0.1) == 1
    assert histogram_quantile(histogram, 0.5) == 4
    assert histogram_quantile(histogram, 0.99) == 9
    assert histogram_quantile({}, 0.5) == 0


def test_arrival_forecaster_samples_at_its_cadence():
    forecaster = ArrivalForecaster(step_s=STEP_S)
    taken = []
    for i in range(100):  # the control plane asks every 0.25 s
        t = i * 0.25
        snapshot = TelemetrySnapshot(
            time=t, window_s=10.0, knobs=Knobs(), arrival_rate=2.0, decode_batch_histogram={3: 5, 12: 1}
        )
        taken.append(forecaster.observe(snapshot))
    assert sum(taken) == 3  # t = 0, 10, 20
    low, high = forecaster.batch_range(25.0, 300.0)
    assert (low, high) == pytest.approx((3.0, 12.0))
    assert forecaster.forecast_arrival_rate(100.0) == pytest.approx(2.0)
