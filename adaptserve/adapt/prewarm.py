"""Predictive prewarm: capture the decode CUDA graphs that the forecast load will need before it
comes, and release the ones that no load has needed for a while.

A decode batch whose bucket has no graph is captured on demand, in the middle of serving: a stall of
tens to hundreds of milliseconds on the step that first needs it. `PrewarmController` pays that cost
ahead, between steps, and gives back the memory of graphs nobody uses.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from adaptserve.adapt.forecast import ArrivalForecaster, observed_batch_band
from adaptserve.adapt.knobs import Decision
from adaptserve.adapt.snapshot import TelemetrySnapshot
from adaptserve.adapt.switch_guard import SwitchGuard

logger = logging.getLogger(__name__)


class GraphPool(Protocol):
    """What the prewarmer drives: the runner's DecodeGraphPool through `RunnerGraphPool`, or
    `SimulatedGraphPool` on a CPU."""

    sizes: list[int]  # every batch bucket the pool can capture, ascending

    def captured_sizes(self) -> list[int]: ...

    def capture(self, sizes: Iterable[int]) -> None: ...

    def release(self, sizes: Iterable[int]) -> None: ...


class BatchForecaster(Protocol):
    def observe(self, snapshot: TelemetrySnapshot) -> bool: ...

    def batch_change(self, t0: float, horizon_s: float) -> tuple[float, float]: ...


@dataclass(frozen=True)
class PrewarmPlan:
    """One round's action: the batch sizes to capture and to release, and why."""

    time: float  # engine clock
    capture: tuple[int, ...] = ()
    release: tuple[int, ...] = ()
    reason: str = ""
    forecast: tuple[float, float] = (0.0, 0.0)  # decode batch band expected over the horizon

    @property
    def is_empty(self) -> bool:
        return not self.capture and not self.release


@dataclass(frozen=True)
class PrewarmConfig:
    horizon_s: float = 300.0  # the forecast must be covered this far ahead
    release_after_s: float = 600.0  # a size neither used nor forecast this long is released
    floor_max_batch: int = 8  # every bucket up to this size stays captured
    max_captures_per_round: int = 2  # graphs captured in one round at most
    memory_limit: float = 0.95  # no capture while gpu_memory_used is above this share
    headroom: float = 0.1  # the forecast high batch is raised by this share before bucketing

    def __post_init__(self) -> None:
        if self.horizon_s <= 0 or self.release_after_s < 0 or self.max_captures_per_round < 1:
            raise ValueError("prewarm needs horizon_s > 0, release_after_s >= 0, max_captures_per_round >= 1")
        if not 0 < self.memory_limit <= 1 or self.headroom < 0:
            raise ValueError("prewarm needs memory_limit in (0, 1] and headroom >= 0")


def _capture_guard() -> SwitchGuard:
    return SwitchGuard(cooldown_s=5.0, confirm=2, max_switches=6, window_s=60.0)


def _release_guard() -> SwitchGuard:
    return SwitchGuard(cooldown_s=60.0, confirm=3, max_switches=2, window_s=600.0)


@dataclass
class PrewarmController:
    """Signal: the decode batch-size band the window saw (quantiles of decode_batch_histogram, the
    running count), moved by the change that the forecast (ArrivalForecaster, fed each round's
    snapshot) expects over the next `horizon_s`: a rise lifts the high end, a fall lowers the low end;
    and the batch sizes the window's steps used.
    Action: not a knob but a PrewarmPlan applied to `pool`: capture the buckets that cover the band
    (and the floor) before they are needed; release a bucket once it has been neither used nor
    forecast for `release_after_s`.
    Thresholds: the band's high end is raised by `headroom`; every bucket up to `floor_max_batch` is
    kept captured.
    Guardrails: never release a floor size or a size used in the last window; at most
    `max_captures_per_round` graphs per round; no capture while gpu_memory_used > `memory_limit`
    (0.95); captures and releases each pass a SwitchGuard (confirmation, cooldown, a cap per window),
    so a load oscillating around a bucket boundary does not capture and release in a loop; a capture
    that fails stops prewarming (on-demand capture stays as it was).

    In a ControlPlane, `decide(snapshot)` runs `step` and returns None: it owns no knob."""

    pool: GraphPool
    config: PrewarmConfig = field(default_factory=PrewarmConfig)
    forecaster: BatchForecaster = field(default_factory=ArrivalForecaster)
    capture_guard: SwitchGuard = field(default_factory=_capture_guard)
    release_guard: SwitchGuard = field(default_factory=_release_guard)
    name: str = "prewarm"
    history: deque = field(default_factory=lambda: deque(maxlen=256))  # non-empty plans applied
    num_captured: int = 0
    num_released: int = 0
    stopped: str | None = None  # why prewarming stopped, once a capture failed
    _last_needed: dict[int, float] = field(default_factory=dict)  # size -> engine time used or forecast
    _change: tuple[float, float] | None = None  # the forecast's (fall, rise), as of its last sample

    def decide(self, snapshot: TelemetrySnapshot) -> Decision | None:
        self.step(snapshot)
        return None

    def step(self, snapshot: TelemetrySnapshot) -> PrewarmPlan:
        """Plan this round and apply the plan to the pool."""
        plan = self.plan(snapshot)
        if plan.is_empty:
            return plan
        if plan.capture:
            try:
                self.pool.capture(plan.capture)
            except RuntimeError as error:  # out of memory, a capture the backend refused
                self.stopped = f"capture of {plan.capture} failed: {error}"
                logger.exception("prewarm: %s; prewarming stops", self.stopped)
                return PrewarmPlan(plan.time, reason=self.stopped, forecast=plan.forecast)
            self.num_captured += len(plan.capture)
        if plan.release:
            self.pool.release(plan.release)
            self.num_released += len(plan.release)
        self.history.append(plan)
        logger.info("prewarm: capture %s release %s (%s)", plan.capture, plan.release, plan.reason)
        return plan

    def plan(self, snapshot: TelemetrySnapshot) -> PrewarmPlan:
        """This round's plan. Advances the forecaster and the guards: the plan is meant to be applied."""
        now, cfg = snapshot.time, self.config
        if self.forecaster.observe(snapshot) or self._change is None:  # new only with a new sample
            self._change = self.forecaster.batch_change(now, cfg.horizon_s)
        fall, rise = self._change
        seen_low, seen_high = observed_batch_band(snapshot)
        low, high = max(0.0, seen_low + fall), seen_high + rise
        band = (low, high)
        captured = set(self.pool.captured_sizes())
        used = {b for b in map(self.bucket, snapshot.decode_batch_histogram) if b is not None}
        wanted = self.floor() | self.covering(low, high * (1.0 + cfg.headroom))
        for size in captured:
            self._last_needed.setdefault(size, now)  # a graph first seen now gets a full release_after_s
        for size in used | wanted:
            self._last_needed[size] = now
        if self.stopped is not None:
            return PrewarmPlan(now, reason=self.stopped, forecast=band)
        capture = self._to_capture(snapshot, sorted(wanted - captured))
        release = self._to_release(now, sorted(captured - wanted - used - self.floor()))
        reason = f"forecast decode batch {low:.1f}..{high:.1f} over {cfg.horizon_s:.0f}s"
        return PrewarmPlan(now, capture, release, reason if capture or release else "", band)

    def _to_capture(self, snapshot: TelemetrySnapshot, missing: list[int]) -> tuple[int, ...]:
        memory = snapshot.gpu_memory_used
        if not missing or (memory is not None and memory > self.config.memory_limit):
            self.capture_guard.reset()
            return ()
        capture = tuple(missing[: self.config.max_captures_per_round])  # smallest first: needed first
        if not self.capture_guard.allow(snapshot.time, capture):
            return ()
        self.capture_guard.switched(snapshot.time)
        return capture

    def _to_release(self, now: float, idle: list[int]) -> tuple[int, ...]:
        release = tuple(s for s in idle if now - self._last_needed[s] >= self.config.release_after_s)
        if not release:
            self.release_guard.reset()
            return ()
        if not self.release_guard.allow(now, release):
            return ()
        self.release_guard.switched(now)
        for size in release:
            del self._last_needed[size]
        return release

    def bucket(self, batch: float) -> int | None:
        """The smallest pool size that holds `batch` sequences; None for an empty or too big batch."""
        if batch <= 0:
            return None
        return next((s for s in self.pool.sizes if s >= batch), None)

    def floor(self) -> set[int]:
        return {s for s in self.pool.sizes if s <= self.config.floor_max_batch}

    def covering(self, low: float, high: float) -> set[int]:
        """Every bucket a batch between `low` and `high` sequences can land in (the largest when the
        high end is past the pool)."""
        if high < 1:
            return set()
        low = min(low, high)
        first = self.bucket(max(1, math.floor(low))) or self.pool.sizes[-1]
        last = self.bucket(math.ceil(high)) or self.pool.sizes[-1]
        return {s for s in self.pool.sizes if first <= s <= last}


class RunnerGraphPool:
    """The GraphPool interface over the runner's DecodeGraphPool: graphs are captured in the precision
    the next decode step would run in, for contexts around `context_len` (as the warm-up does)."""

    def __init__(self, pool, precision: Callable[[], str], context_len: int = 1024):
        self.pool, self.precision, self.context_len = pool, precision, context_len

    @classmethod
    def from_runner(cls, runner, context_len: int = 1024) -> RunnerGraphPool | None:
        """None when the runner replays no graphs (CPU, graphs off or failed)."""
        graphs = getattr(runner, "graphs", None)
        return None if graphs is None else cls(graphs, runner.precision.peek, context_len)

    @property
    def sizes(self) -> list[int]:
        return self.pool.sizes

    def captured_sizes(self) -> list[int]:
        return self.pool.captured_sizes()

    def capture(self, sizes: Iterable[int]) -> None:
        self.pool.capture(sizes, self.precision(), self.context_len)

    def release(self, sizes: Iterable[int]) -> None:
        self.pool.release(sizes)


class SimulatedGraphPool:
    """The GraphPool interface as bookkeeping only (CPU runs, the simulator, tests): which sizes hold
    a graph, and each capture and release with the time `clock` gives."""

    def __init__(
        self, sizes: Iterable[int], captured: Iterable[int] = (), clock: Callable[[], float] | None = None
    ):
        self.sizes = sorted(set(sizes))
        self._captured = set(captured)
        self.clock = clock or (lambda: 0.0)
        self.events: list[tuple[float, str, int]] = []  # (time, "capture" | "release", size)

    def captured_sizes(self) -> list[int]:
        return sorted(self._captured)

    def capture(self, sizes: Iterable[int]) -> None:
        for size in sizes:
            if size not in self.sizes:
                raise ValueError(f"batch size {size} is not a bucket of this pool: {self.sizes}")
            if size not in self._captured:
                self._captured.add(size)
                self.events.append((self.clock(), "capture", size))

    def release(self, sizes: Iterable[int]) -> None:
        for size in sizes:
            if size in self._captured:
                self._captured.discard(size)
                self.events.append((self.clock(), "release", size))

    def count(self, kind: str, size: int | None = None) -> int:
        return sum(1 for _, k, s in self.events if k == kind and (size is None or s == size))
