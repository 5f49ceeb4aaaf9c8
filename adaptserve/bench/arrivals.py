"""When each benchmark request is sent: arrival processes, deterministic by seed.

`GammaArrivals` is vLLM's process (`--request-rate`, `--burstiness`). `BurstyArrivals` and
`DiurnalArrivals` vary the rate over time and are drawn by thinning (Lewis-Shedler): candidates come
from a Poisson process at the maximum rate and each is kept with probability `rate_at(t) / max_rate`.
`TraceArrivals` replays recorded offsets. Every process gives offsets in seconds from the benchmark start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

THINNING_BATCH = 1024  # candidates drawn per step; fixed so times(n) is a prefix of times(n + k)


class ArrivalProcess(Protocol):
    """What the benchmark client needs from an arrival process."""

    @property
    def mean_rate(self) -> float: ...  # long-run requests per second

    def times(self, num: int, seed: int) -> list[float]: ...  # num offsets (s), non-decreasing

    def describe(self) -> dict[str, Any]: ...  # name, parameters and a one-line rule; JSON-able


def check_positive(name: str, value: float, allow_inf: bool = False) -> None:
    """A ValueError naming the field unless `value` > 0 and, unless `allow_inf`, finite (NaN is refused)."""
    if not value > 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be > 0{'' if allow_inf else ' and finite'}, got {value}")


def check_num(num: int) -> None:
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")


def json_rate(rate: float) -> float | str:
    """A rate for JSON: infinity is written "inf", as vLLM writes it in its result files."""
    return "inf" if math.isinf(rate) else rate


def thin(rate_fn: Callable[[np.ndarray], np.ndarray], max_rate: float, num: int, seed: int) -> list[float]:
    """The first `num` arrivals of a Poisson process with rate `rate_fn(t) <= max_rate`, by thinning."""
    check_num(num)
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    num_kept, t = 0, 0.0
    while num_kept < num:
        candidates = t + np.cumsum(rng.exponential(1.0 / max_rate, THINNING_BATCH))  # [BATCH] s
        keep = rng.random(THINNING_BATCH) * max_rate < rate_fn(candidates)  # [BATCH] bool
        kept.append(candidates[keep])
        num_kept += int(keep.sum())
        t = float(candidates[-1])
    return np.concatenate(kept)[:num].tolist() if kept else []


@dataclass(frozen=True, slots=True)
class GammaArrivals:
    """vLLM's process: gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)), first request at 0.

    The mean gap is 1/rate and the gaps' coefficient of variation is 1/sqrt(burstiness): burstiness 1 is
    Poisson, below 1 burstier, above 1 more even. rate=inf sends every request at 0.
    """

    rate: float  # requests per second; inf = all at once
    burstiness: float = 1.0  # Gamma shape

    def __post_init__(self) -> None:
        check_positive("rate", self.rate, allow_inf=True)
        check_positive("burstiness", self.burstiness)

    @property
    def mean_rate(self) -> float:
        return self.rate

    def times(self, num: int, seed: int) -> list[float]:
        """`num` offsets in seconds: 0, then cumulative Gamma gaps."""
        check_num(num)
        if num == 0:
            return []
        if math.isinf(self.rate):
            return [0.0] * num
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=self.burstiness, scale=1.0 / (self.rate * self.burstiness), size=num - 1)
        return [0.0, *np.cumsum(gaps).tolist()]

    def describe(self) -> dict[str, Any]:
        return {
            "name": "gamma",
            "rate": json_rate(self.rate),
            "burstiness": self.burstiness,
            "mean_rate": json_rate(self.rate),
            "rule": "Gamma gaps, mean 1/rate, CV 1/sqrt(burstiness); first request at 0",
        }


@dataclass(frozen=True, slots=True)
class BurstyArrivals:
    """A Poisson process whose rate is a square wave: `on_rate` for `on_s`, then `off_rate` for `off_s`."""

    on_rate: float  # requests per second during an on phase
    off_rate: float  # requests per second during an off phase; may be 0
    on_s: float  # length of an on phase, seconds; the process starts with one
    off_s: float  # length of an off phase, seconds

    def __post_init__(self) -> None:
        for name in ("on_rate", "on_s", "off_s"):
            check_positive(name, getattr(self, name))
        if not 0 <= self.off_rate < math.inf:
            raise ValueError(f"off_rate must be >= 0 and finite, got {self.off_rate}")

    @property
    def mean_rate(self) -> float:
        return (self.on_rate * self.on_s + self.off_rate * self.off_s) / (self.on_s + self.off_s)

    def rates(self, t: np.ndarray) -> np.ndarray:
        """The rate at each time in `t` (s)."""
        is_on = np.mod(t, self.on_s + self.off_s) < self.on_s
        return np.where(is_on, self.on_rate, self.off_rate)

    def rate_at(self, t: float) -> float:
        return float(self.rates(np.asarray(t, dtype=np.float64)))

    def times(self, num: int, seed: int) -> list[float]:
        return thin(self.rates, max(self.on_rate, self.off_rate), num, seed)

    def describe(self) -> dict[str, Any]:
        rule = "Poisson at on_rate for on_s, then off_rate for off_s, repeating; starts on"
        return {"name": "bursty", **asdict(self), "mean_rate": self.mean_rate, "rule": rule}


@dataclass(frozen=True, slots=True)
class DiurnalArrivals:
    """A Poisson process with rate `mean_rate * (1 + amplitude * sin(2*pi*t / period_s))`.

    It starts at the mean rate and rises first: the first half of each period is above the mean.
    """

    mean_rate: float  # requests per second, averaged over a period
    amplitude: float  # 0..1, the swing as a fraction of the mean
    period_s: float  # seconds per cycle

    def __post_init__(self) -> None:
        check_positive("mean_rate", self.mean_rate)
        check_positive("period_s", self.period_s)
        if not 0 <= self.amplitude <= 1:
            raise ValueError(f"amplitude must be in [0, 1], got {self.amplitude}")

    def rates(self, t: np.ndarray) -> np.ndarray:
        """The rate at each time in `t` (s)."""
        return self.mean_rate * (1 + self.amplitude * np.sin(2 * np.pi * t / self.period_s))

    def rate_at(self, t: float) -> float:
        return float(self.rates(np.asarray(t, dtype=np.float64)))

    def times(self, num: int, seed: int) -> list[float]:
        return thin(self.rates, self.mean_rate * (1 + self.amplitude), num, seed)

    def describe(self) -> dict[str, Any]:
        rule = "Poisson at mean_rate * (1 + amplitude * sin(2*pi*t / period_s)), thinned"
        return {"name": "diurnal", **asdict(self), "rule": rule}


@dataclass(frozen=True, slots=True)
class TraceArrivals:
    """Replays recorded offsets (s, non-decreasing); the seed is ignored."""

    offsets: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.offsets:
            raise ValueError("offsets must not be empty")
        if not all(math.isfinite(x) and x >= 0 for x in self.offsets):
            raise ValueError("offsets must be finite and >= 0")
        unsorted = [i for i in range(1, len(self.offsets)) if self.offsets[i] < self.offsets[i - 1]]
        if unsorted:
            raise ValueError(f"offsets must be non-decreasing; offsets[{unsorted[0]}] < the one before")

    @property
    def mean_rate(self) -> float:
        """(n - 1) arrivals over the span from the first to the last; inf when they all coincide."""
        span = self.offsets[-1] - self.offsets[0]
        return (len(self.offsets) - 1) / span if span > 0 else math.inf

    def times(self, num: int, seed: int) -> list[float]:
        check_num(num)
        if num > len(self.offsets):
            raise ValueError(f"num must be <= {len(self.offsets)} (the trace's length), got {num}")
        return [float(x) for x in self.offsets[:num]]

    def describe(self) -> dict[str, Any]:
        return {
            "name": "trace",
            "num_offsets": len(self.offsets),
            "span_s": self.offsets[-1] - self.offsets[0],
            "mean_rate": json_rate(self.mean_rate),
            "rule": "replay of recorded offsets",
        }


OPTIONS = {
    "gamma": (),
    "bursty": ("on_rate", "off_rate", "on_s", "off_s"),
    "diurnal": ("amplitude", "period_s"),
}


def parse_arrivals(
    kind: str, request_rate: float, burstiness: float, options: dict[str, float]
) -> ArrivalProcess:
    """The arrival process the CLI asked for, with defaults that keep the long-run mean at request_rate.

    gamma (alias poisson): `GammaArrivals(request_rate, burstiness)`; no options.
    bursty: on_s = off_s = 10 s; on windows carry 80% of arrivals, off windows 20%, i.e.
    on_rate = 0.8 * r * (on_s + off_s) / on_s and off_rate = 0.2 * r * (on_s + off_s) / off_s
    (1.6 r and 0.4 r by default). If only one rate is given, the other is solved from
    mean = (on_rate * on_s + off_rate * off_s) / (on_s + off_s) = r; if both are given, they win.
    diurnal: mean_rate = r, amplitude 0.8, period_s 60.
    """
    kind = "gamma" if kind == "poisson" else kind
    if kind not in OPTIONS:
        raise ValueError(f"unknown arrival kind {kind!r}; allowed: gamma, poisson, bursty, diurnal")
    for name in options:
        if name not in OPTIONS[kind]:
            allowed = ", ".join(OPTIONS[kind]) or "none"
            raise ValueError(f"unknown option {name!r} for {kind} arrivals; allowed: {allowed}")
    opts = {name: float(value) for name, value in options.items()}
    if kind == "gamma":
        return GammaArrivals(request_rate, burstiness)
    check_positive("request_rate", request_rate)  # inf is only for gamma
    if kind == "diurnal":
        return DiurnalArrivals(request_rate, opts.get("amplitude", 0.8), opts.get("period_s", 60.0))
    return bursty(request_rate, opts)


def bursty(request_rate: float, opts: dict[str, float]) -> BurstyArrivals:
    """`BurstyArrivals` from the CLI options, filling in the ones left out (see `parse_arrivals`)."""
    on_s, off_s = opts.get("on_s", 10.0), opts.get("off_s", 10.0)
    check_positive("on_s", on_s)
    check_positive("off_s", off_s)
    total = request_rate * (on_s + off_s)  # arrivals per on+off cycle
    on_rate, off_rate = opts.get("on_rate"), opts.get("off_rate")
    if on_rate is None and off_rate is None:
        on_rate, off_rate = 0.8 * total / on_s, 0.2 * total / off_s
    elif on_rate is None:
        on_rate = (total - off_rate * off_s) / on_s
    elif off_rate is None:
        off_rate = (total - on_rate * on_s) / off_s
    if on_rate <= 0 or off_rate < 0:
        raise ValueError(
            f"bursty options give on_rate={on_rate}, off_rate={off_rate} for request_rate={request_rate}; "
            "need on_rate > 0 and off_rate >= 0"
        )
    return BurstyArrivals(on_rate, off_rate, on_s, off_s)
