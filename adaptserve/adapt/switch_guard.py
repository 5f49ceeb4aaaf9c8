"""The one helper every controller uses so that nothing thrashes: a hysteresis band on the signal,
a confirmation count, a cooldown after each switch and a cap on switches per window."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Hysteresis:
    """A two-state band: goes `high` only above `high`, back to low only below `low`. A signal that
    oscillates inside [low, high] never changes the state."""

    low: float
    high: float
    is_high: bool = False

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"hysteresis low={self.low} must be <= high={self.high}")

    def update(self, signal: float) -> bool:
        if self.is_high and signal < self.low:
            self.is_high = False
        elif not self.is_high and signal > self.high:
            self.is_high = True
        return self.is_high


@dataclass
class SwitchGuard:
    """Lets a proposed value through only when it has been proposed `confirm` times in a row, the
    last switch is `cooldown_s` old, and fewer than `max_switches` happened in the last `window_s`.
    `allow(now, value)` is asked every decision round; `switched(now)` is told when one is applied."""

    cooldown_s: float = 5.0  # least time between two switches
    confirm: int = 2  # consecutive rounds that must propose the same value
    max_switches: int = 6  # most switches ...
    window_s: float = 60.0  # ... in this many seconds
    _proposal: object = None
    _streak: int = 0
    _last_switch: float = float("-inf")
    _switch_times: deque = field(default_factory=deque)
    num_blocked: int = 0  # proposals held back (for tests and telemetry)

    def __post_init__(self) -> None:
        if self.confirm < 1 or self.max_switches < 1 or self.cooldown_s < 0 or self.window_s <= 0:
            raise ValueError(
                "SwitchGuard needs confirm >= 1, max_switches >= 1, cooldown_s >= 0, window_s > 0"
            )

    def allow(self, now: float, value: object) -> bool:
        if value == self._proposal:
            self._streak += 1
        else:
            self._proposal, self._streak = value, 1
        while self._switch_times and self._switch_times[0] <= now - self.window_s:
            self._switch_times.popleft()
        ok = (
            self._streak >= self.confirm
            and now - self._last_switch >= self.cooldown_s
            and len(self._switch_times) < self.max_switches
        )
        if not ok:
            self.num_blocked += 1
        return ok

    def switched(self, now: float) -> None:
        self._last_switch = now
        self._switch_times.append(now)
        self._proposal, self._streak = None, 0

    def reset(self) -> None:
        """Forget the current proposal (the signal went back to what the knob already is)."""
        self._proposal, self._streak = None, 0
