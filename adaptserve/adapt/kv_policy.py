"""The KV-cache format new blocks are written in: a ladder from high to low precision, stepped down
under memory pressure (now or forecast) and held up by a quality floor on the measured KV error.
The engine requantizes cold blocks to the chosen format in the background; this module only chooses.

A ladder may hold int4k (int4 keys per channel, KIVI; between int8 and int4 in quality, e.g.
bf16 -> int8 -> int4k -> int4): at that level new tokens are still written in int8 and full cold
blocks are requantized into int4k (see engine/kv_cache/formats.py). The default ladder leaves it out."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from adaptserve.adapt.knobs import Decision
from adaptserve.adapt.snapshot import TelemetrySnapshot
from adaptserve.adapt.switch_guard import Hysteresis, SwitchGuard

__all__ = ["KV_LADDER_FORMATS", "KVFormatPolicy", "KVPolicySettings"]

KV_LADDER_FORMATS = ("bf16", "fp8", "int8", "int4k", "int4")  # every format a ladder may hold, high to low


@dataclass(frozen=True)
class KVPolicySettings:
    """The ladder, thresholds and guardrails of KVFormatPolicy (its docstring says how each is used)."""

    ladder: tuple[str, ...] = ("bf16", "int8", "int4")  # high to low; bf16 = the model's dtype; opt in: int4k
    enter: tuple[float, ...] = ()  # pressure > enter[i-1] enters level i; () = even over 0.80..0.90
    exit_margin: float = 0.15  # level i is left only when pressure < enter[i-1] - exit_margin
    horizon_s: float = 5.0  # forecast kv usage this far ahead; 0 = no forecast
    trend_window_s: float = 10.0  # fit the usage slope over this many seconds of snapshots
    error_budget: float = 0.05  # kv_error above this reverts one level at once and sets a floor
    floor_hold_s: float = 60.0  # the floor lifts after this long with kv_error < error_budget / 2
    confirm: int = 2  # SwitchGuard: rounds a pressure move must be proposed in a row
    cooldown_s: float = 2.0  # SwitchGuard: least seconds between two switches
    max_switches: int = 6  # SwitchGuard: most switches ...
    window_s: float = 60.0  # ... in this many seconds

    def __post_init__(self) -> None:
        self._check_ladder()
        enter, levels = self.thresholds, len(self.ladder) - 1
        increasing = all(a < b for a, b in zip(enter, enter[1:], strict=False))
        if len(enter) != levels or not increasing or not all(0 < e <= 1 for e in enter):
            raise ValueError(
                f"kv_policy.enter={self.enter!r} needs {levels} thresholds in (0, 1], strictly increasing"
            )
        if not 0 <= self.exit_margin < enter[0]:
            raise ValueError(
                f"kv_policy.exit_margin={self.exit_margin} must be in [0, {enter[0]}) (the lowest enter)"
            )
        limits = [(n, 0, ">=") for n in ("horizon_s", "floor_hold_s", "cooldown_s")]
        limits += [(n, 0, ">") for n in ("trend_window_s", "error_budget", "window_s")]
        limits += [(n, 1, ">=") for n in ("confirm", "max_switches")]
        for name, limit, op in limits:
            value = getattr(self, name)
            if not (value > limit if op == ">" else value >= limit):  # also refuses NaN
                raise ValueError(f"kv_policy.{name}={value} must be {op} {limit}")

    @property
    def thresholds(self) -> tuple[float, ...]:
        """enter[i-1] for each level i >= 1: the given ones, or spread evenly over 0.80..0.90."""
        if self.enter:
            return tuple(self.enter)
        levels = len(self.ladder) - 1
        return tuple(round(0.80 + 0.10 * i / max(levels - 1, 1), 4) for i in range(levels))

    def _check_ladder(self) -> None:
        for fmt in self.ladder:
            if fmt not in KV_LADDER_FORMATS:
                raise ValueError(
                    f"kv_policy.ladder has unknown format {fmt!r}; known: {', '.join(KV_LADDER_FORMATS)}"
                )
        ranks = [KV_LADDER_FORMATS.index(fmt) for fmt in self.ladder]
        if len(ranks) < 2 or ranks[0] != 0 or ranks != sorted(set(ranks)):
            raise ValueError(
                f"kv_policy.ladder={tuple(self.ladder)!r} must start at bf16 and list at least 2 formats, "
                f"each once, high to low ({' > '.join(KV_LADDER_FORMATS)})"
            )


class KVFormatPolicy:
    """Signal: pressure = max(kv_usage, the usage forecast `horizon_s` ahead), where the forecast is
    kv_usage + horizon_s × the least-squares slope of (time, kv_usage) over the last `trend_window_s`,
    clipped to [0, 1]; it needs 3 samples spanning at least half that window (a fit over a shorter
    span extrapolates noise). Any preemption in the snapshot's window makes the pressure 1.0.
    Signal for quality: kv_error, the relative error of compressed KV (None: nothing measured, 0).
    Knob: kv_format, the format new KV blocks are written in; level i is `ladder[i]`, 0 = bf16. The
    level follows the knob in each snapshot, so a change the control plane dropped is not assumed.
    Thresholds: one Hysteresis band per level i: high when pressure > enter[i-1], low again only when
    pressure < enter[i-1] - exit_margin. The target is the highest level whose band is high, so a
    jump in pressure moves several levels in one decision.
    Guardrails: pressure moves, down and up, pass a SwitchGuard (confirm, cooldown, a cap per window).
    kv_error > error_budget marks the current level as failed and reverts one level at once (no
    confirm or cooldown, but counted by the guard; each round over budget reverts one more level);
    the failed level and all below it stay forbidden (the floor) until kv_error has been under
    error_budget / 2 for floor_hold_s. Memory pressure never goes below the floor."""

    name = "kv_format"

    def __init__(self, settings: KVPolicySettings | None = None):
        self.settings = s = settings or KVPolicySettings()
        self.ladder = tuple(s.ladder)
        self.enter = s.thresholds
        self._bands = [Hysteresis(low=e - s.exit_margin, high=e) for e in self.enter]
        self._guard = SwitchGuard(s.cooldown_s, s.confirm, s.max_switches, s.window_s)
        self._samples: deque[tuple[float, float]] = deque()  # (time, kv_usage) within trend_window_s
        self._level = 0
        self._floor: int | None = None  # deepest level allowed while the quality floor holds
        self._quiet_since: float | None = None  # kv_error under half the budget since then
        self._pressure = 0.0
        self._last_reason = ""
        # format -> its last measured error (the runner's monitor samples every ladder format, so a
        # format over budget is never entered, not only left once it hurt); unknown = allowed
        self.format_errors: dict[str, float] = {}

    @property
    def level(self) -> int:
        """Index in `ladder` of the format new blocks are written in."""
        return self._level

    @property
    def floor_level(self) -> int:
        """The deepest level allowed now: above the first format measured over the error budget, and
        above the floor a broken budget set."""
        deepest = len(self.ladder) - 1
        for level, fmt in enumerate(self.ladder[1:], start=1):
            if self.format_errors.get(fmt, 0.0) > self.settings.error_budget:
                deepest = level - 1
                break
        return deepest if self._floor is None else min(deepest, self._floor)

    @property
    def last_reason(self) -> str:
        return self._last_reason

    def describe(self) -> dict:
        return {
            "kv_format": self.ladder[self._level],
            "floor": None if self._floor is None else self.ladder[self._floor],
            "pressure": round(self._pressure, 4),
            "enter": self.enter,
            "num_blocked": self._guard.num_blocked,
        }

    def decide(self, snapshot: TelemetrySnapshot) -> Decision | None:
        now, usage, s = snapshot.time, snapshot.kv_usage, self.settings
        if snapshot.knobs.kv_format in self.ladder:
            self._level = self.ladder.index(snapshot.knobs.kv_format)
        forecast = self._forecast(now, usage)
        self._pressure = 1.0 if snapshot.preemptions > 0 else max(usage, forecast or 0.0)
        wanted = max((i + 1 for i, band in enumerate(self._bands) if band.update(self._pressure)), default=0)
        error = snapshot.kv_error or 0.0
        if error > s.error_budget:
            return self._revert(now, error)
        self._update_floor(now, error)
        target = min(wanted, self.floor_level)
        if target == self._level:
            self._guard.reset()
            return None
        if not self._guard.allow(now, target):
            return None
        if snapshot.preemptions > 0:
            signal = f"{snapshot.preemptions} preemptions (kv usage {usage:.2f})"
        else:
            signal = f"kv usage {usage:.2f}" + ("" if forecast is None else f" (forecast {forecast:.2f})")
        if wanted > target:
            rule = ", held at the quality floor"
        elif snapshot.preemptions > 0:
            rule = ""
        elif target > self._level:
            rule = f" > {self.enter[target - 1]:.2f}"
        else:
            rule = f" < {self.enter[target] - s.exit_margin:.2f}"
        return self._switch(now, target, f"{signal}{rule}: write {self.ladder[target]}")

    def _forecast(self, now: float, usage: float) -> float | None:
        """Usage `horizon_s` ahead from the least-squares slope of the recent samples, or None."""
        s, samples = self.settings, self._samples
        samples.append((now, usage))
        while samples[0][0] < now - s.trend_window_s:
            samples.popleft()
        if s.horizon_s == 0 or len(samples) < 3 or now - samples[0][0] < s.trend_window_s / 2:
            return None
        t_mean = sum(t for t, _ in samples) / len(samples)
        u_mean = sum(u for _, u in samples) / len(samples)
        variance = sum((t - t_mean) ** 2 for t, _ in samples)
        slope = sum((t - t_mean) * (u - u_mean) for t, u in samples) / variance
        return min(1.0, max(0.0, usage + slope * s.horizon_s))

    def _revert(self, now: float, error: float) -> Decision | None:
        """Quality first: forbid the current level and below, and go one level up at once."""
        failed = self._level
        self._floor = max(0, min(failed - 1, self.floor_level))
        self._quiet_since = None
        if failed == 0:
            return None
        budget = self.settings.error_budget
        reason = f"kv_error {error:.2f} > budget {budget:.2f}: back to {self.ladder[failed - 1]}"
        return self._switch(now, failed - 1, reason)

    def _update_floor(self, now: float, error: float) -> None:
        if self._floor is None:
            return
        if error >= self.settings.error_budget / 2:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        if self._quiet_since is not None and now - self._quiet_since >= self.settings.floor_hold_s:
            self._floor = self._quiet_since = None

    def _switch(self, now: float, level: int, reason: str) -> Decision:
        decision = Decision({"kv_format": self.ladder[level]}, reason, self.name)  # validates first
        self._guard.switched(now)
        self._level, self._last_reason = level, reason
        return decision
