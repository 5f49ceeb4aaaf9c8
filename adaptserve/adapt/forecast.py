"""Load forecasts for the controllers that must act before the load arrives (CUDA-graph prewarm).

`HoltWinters` forecasts one scalar series with an additive model:

    value(t) = level + damped trend + daily[slot(t)] + weekly[slot(t)]

- level and trend: exponential smoothing (`alpha`, `beta`, per `step_s`, the caller's cadence) of the
  series with its seasons taken out; the trend is damped by `phi` per step, so a short ramp is not
  extrapolated far;
- each season is a profile of slot factors (288 five-minute slots a day, 7 one-day slots a week)
  learned from slot means, apart from the level: the first whole period sets the profile (slot mean
  minus the period's mean); later, each slot's factor moves by `gamma` towards its deviation from the
  mean of the period centred on it (so neither a trend nor a step biases one side), learned half a
  period late; the profile is kept centred on zero. A season is used only once a whole period has
  been seen, so a short history forecasts level + trend.

Time is the caller's clock (the engine's), never the wall clock. A slot is `t // slot_s mod slots`,
so a clock with an arbitrary zero still lines one day up with the next. Nothing is random.

`ArrivalForecaster` keeps the series the prewarmer reads, sampled from TelemetrySnapshots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adaptserve.adapt.snapshot import TelemetrySnapshot

DAY_S = 86400.0


@dataclass(frozen=True)
class Seasonality:
    """One repeating pattern: `num_slots` factors over `period_s` seconds."""

    period_s: float
    num_slots: int


DAILY = Seasonality(DAY_S, 288)  # five-minute slots
WEEKLY = Seasonality(7 * DAY_S, 7)  # one slot a day


class _Season:
    """A seasonal profile learned online from slot means; inactive until a whole period is seen."""

    def __init__(self, seasonality: Seasonality, gamma: float):
        if seasonality.num_slots < 2 or seasonality.period_s <= 0:
            raise ValueError(f"a season needs num_slots >= 2 and period_s > 0, got {seasonality}")
        self.num_slots = seasonality.num_slots
        self.slot_s = seasonality.period_s / seasonality.num_slots
        self.gamma = gamma
        self.factors = np.zeros(self.num_slots)  # [slots] added to the level
        self.slot_means = np.full(self.num_slots, np.nan)  # [slots] the last period's means; nan: no data
        self.active = False
        self._first_slot: int | None = None  # absolute slot index of the first observation
        self._slot: int | None = None  # absolute slot index being accumulated
        self._sum = 0.0
        self._count = 0

    def factor(self, t: float) -> float:
        return float(self.factors[int(t // self.slot_s) % self.num_slots]) if self.active else 0.0

    def factors_at(self, times: np.ndarray) -> np.ndarray:
        if not self.active:
            return np.zeros(len(times))
        return self.factors[(times // self.slot_s).astype(np.int64) % self.num_slots]  # [T]

    def add(self, value: float) -> None:
        self._sum += value
        self._count += 1

    def advance(self, t: float) -> bool:
        """Close the slot being accumulated once `t` is past it; True when that activates the season."""
        slot = int(t // self.slot_s)
        if self._slot is None:
            self._first_slot = self._slot = slot
            return False
        if slot <= self._slot:
            return False
        closed = self._slot
        mean = self._sum / self._count if self._count else math.nan
        if slot - closed > self.num_slots:
            self.slot_means[:] = math.nan  # a gap longer than a period: the old means are stale
        else:
            for skipped in range(closed + 1, slot):  # slots without observations
                self.slot_means[skipped % self.num_slots] = math.nan
        self.slot_means[closed % self.num_slots] = mean
        self._slot, self._sum, self._count = slot, 0.0, 0
        if np.isnan(self.slot_means).all():
            return False
        baseline = float(np.nanmean(self.slot_means))
        if not self.active:
            if closed - self._first_slot + 1 < self.num_slots:
                return False
            self.factors = np.nan_to_num(self.slot_means - baseline)
            self.active = True
            return True
        # the slot half a period back is now the centre of the last period's means
        index = (closed - self.num_slots // 2) % self.num_slots
        centred = self.slot_means[index]
        if not math.isnan(centred):
            self.factors[index] += self.gamma * (centred - baseline - self.factors[index])
            self.factors -= self.factors.mean()
        return False


def _damped_steps(phi: float, steps: float | np.ndarray) -> float | np.ndarray:
    """phi + phi^2 + ... + phi^steps: how many steps of the current trend a forecast adds."""
    if phi >= 1.0:
        return steps
    return phi * (1.0 - phi**steps) / (1.0 - phi)


class HoltWinters:
    """Additive level + damped trend + daily and weekly seasons for one series (see the module doc).
    `observe(t, value)` at a fixed cadence of about `step_s`; `forecast(t)` for any later time."""

    def __init__(
        self,
        step_s: float = 10.0,
        alpha: float = 0.2,
        beta: float = 0.02,
        phi: float = 0.97,
        gamma: float = 0.2,
        seasons: Sequence[Seasonality] = (DAILY, WEEKLY),
    ):
        if step_s <= 0:
            raise ValueError(f"forecast step_s={step_s} must be > 0")
        for name, value in (("alpha", alpha), ("beta", beta), ("phi", phi), ("gamma", gamma)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"forecast {name}={value} must be in (0, 1]")
        self.step_s, self.alpha, self.beta, self.phi = step_s, alpha, beta, phi
        self.seasons = [_Season(s, gamma) for s in seasons]
        self.level = 0.0
        self.trend = 0.0  # per step_s
        self.last_time: float | None = None
        self.num_observations = 0

    def observe(self, t: float, value: float) -> None:
        if self.last_time is not None and t < self.last_time:
            raise ValueError(f"forecast observation at t={t} is before the last one at {self.last_time}")
        activated = [season for season in self.seasons if season.advance(t)]
        factors = [season.factor(t) for season in self.seasons]
        if self.last_time is None:
            self.level = value - sum(factors)
        else:
            if activated:
                # the level followed the series with this season still in it, and the trend was
                # mostly the season's own slope: take both out
                self.level -= sum(season.factor(self.last_time) for season in activated)
                self.trend = 0.0
            self._smooth(value - sum(factors), (t - self.last_time) / self.step_s)
        total = sum(factors)
        for season, own in zip(self.seasons, factors, strict=True):
            season.add(value - (total - own))  # each season learns from the series less the others
        self.last_time = t
        self.num_observations += 1

    def _smooth(self, deseasonalized: float, steps: float) -> None:
        predicted = self.level + self.trend * _damped_steps(self.phi, steps)
        level = self.alpha * deseasonalized + (1.0 - self.alpha) * predicted
        if steps > 0:
            slope = (level - self.level) / steps
            self.trend = self.beta * slope + (1.0 - self.beta) * self.phi**steps * self.trend
        self.level = level

    def forecast(self, t_future: float) -> float:
        """The expected value at `t_future` (0 before any observation)."""
        return float(self.forecast_path(np.array([t_future], dtype=np.float64))[0])

    def forecast_path(self, times: np.ndarray) -> np.ndarray:
        """The expected value at each of `times` [T] -> [T]."""
        times = np.asarray(times, dtype=np.float64)
        if self.last_time is None:
            return np.zeros(len(times))
        steps = np.maximum(times - self.last_time, 0.0) / self.step_s  # [T]
        path = self.level + self.trend * _damped_steps(self.phi, steps)  # [T]
        for season in self.seasons:
            path = path + season.factors_at(times)
        return path

    def forecast_range(self, t0: float, horizon_s: float) -> tuple[float, float]:
        """(lowest, highest) expected value over [t0, t0 + horizon_s], every step_s."""
        path = self.forecast_path(self._grid(t0, horizon_s))
        return float(path.min()), float(path.max())

    def forecast_max(self, t0: float, horizon_s: float) -> float:
        return self.forecast_range(t0, horizon_s)[1]

    def _grid(self, t0: float, horizon_s: float) -> np.ndarray:
        num = max(1, math.ceil(max(horizon_s, 0.0) / self.step_s))
        return t0 + np.linspace(0.0, max(horizon_s, 0.0), num + 1)  # [num + 1]


def histogram_quantile(histogram: dict[int, int], q: float) -> int:
    """The smallest size whose cumulative step count reaches q of all steps (0 when empty)."""
    total = sum(histogram.values())
    if total == 0:
        return 0
    seen = 0
    for size in sorted(histogram):
        seen += histogram[size]
        if seen >= q * total:
            return size
    return max(histogram)


def observed_batch_band(
    snapshot: TelemetrySnapshot, low_q: float = 0.1, high_q: float = 0.99
) -> tuple[int, int]:
    """(low, high) decode batch of the snapshot's window: quantiles of its decode batch histogram,
    the high end raised to the running count (each running request decodes soon)."""
    histogram = snapshot.decode_batch_histogram
    high = max(histogram_quantile(histogram, high_q), snapshot.num_running)
    return histogram_quantile(histogram, low_q), high


class ArrivalForecaster:
    """Arrival rate and the decode batch-size band, one HoltWinters each, sampled every `step_s` of
    engine time from TelemetrySnapshots (the control plane asks more often; extra snapshots are
    skipped). The band's ends are the observed_batch_band of each snapshot at `low_quantile` and
    `high_quantile`."""

    def __init__(
        self, step_s: float = 10.0, low_quantile: float = 0.1, high_quantile: float = 0.99, **smoothing
    ):
        if not 0.0 <= low_quantile <= high_quantile <= 1.0:
            raise ValueError(f"need 0 <= low_quantile={low_quantile} <= high_quantile={high_quantile} <= 1")
        self.step_s = step_s
        self.low_quantile, self.high_quantile = low_quantile, high_quantile
        self.arrival_rate = HoltWinters(step_s, **smoothing)  # requests per second
        self.mean_batch = HoltWinters(step_s, **smoothing)  # mean decode batch
        self.low_batch = HoltWinters(step_s, **smoothing)
        self.high_batch = HoltWinters(step_s, **smoothing)
        self._next_sample = -math.inf

    def observe(self, snapshot: TelemetrySnapshot) -> bool:
        """Feed one snapshot; False when it came sooner than `step_s` after the last one taken."""
        t = snapshot.time
        if t < self._next_sample:
            return False
        self._next_sample = t + self.step_s
        low, high = observed_batch_band(snapshot, self.low_quantile, self.high_quantile)
        self.arrival_rate.observe(t, snapshot.arrival_rate)
        self.mean_batch.observe(t, snapshot.mean_decode_batch)
        self.low_batch.observe(t, low)
        self.high_batch.observe(t, high)
        return True

    def batch_range(self, t0: float, horizon_s: float) -> tuple[float, float]:
        """(lowest low, highest high) decode batch expected over [t0, t0 + horizon_s], >= 0."""
        low = self.low_batch.forecast_range(t0, horizon_s)[0]
        high = self.high_batch.forecast_max(t0, horizon_s)
        return max(0.0, low), max(0.0, high)

    def batch_change(self, t0: float, horizon_s: float) -> tuple[float, float]:
        """(fall <= 0 of the low end, rise >= 0 of the high end) the forecast expects over
        [t0, t0 + horizon_s], relative to its own value at t0: what to add to the band seen now.
        Relative, because a smoothed level lags the present: after a sudden drop it still says "high"
        for a while, but it does not say "higher"."""
        low_now, high_now = self.low_batch.forecast(t0), self.high_batch.forecast(t0)
        low = self.low_batch.forecast_range(t0, horizon_s)[0]
        high = self.high_batch.forecast_max(t0, horizon_s)
        return min(0.0, low - low_now), max(0.0, high - high_now)

    def forecast_arrival_rate(self, t_future: float) -> float:
        return max(0.0, self.arrival_rate.forecast(t_future))
