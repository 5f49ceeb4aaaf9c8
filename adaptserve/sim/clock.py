"""Virtual time for the simulator: the engine reads it as its clock, the simulator moves it forward."""

from __future__ import annotations


class VirtualClock:
    """Seconds of simulated time. Calling it returns now (the engine's `clock` protocol); only
    `advance_to` and `advance` move it, and never backwards, so every engine timestamp stays ordered."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0):
        self._now = float(start)

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        """Move to time `t`; a ValueError if that is in the past."""
        if t < self._now:
            raise ValueError(f"virtual time cannot go back: now {self._now}, asked for {t}")
        self._now = float(t)

    def advance(self, dt: float) -> None:
        """Move forward by `dt` >= 0 seconds."""
        if dt < 0:
            raise ValueError(f"virtual time cannot go back: advance by {dt}")
        self._now += dt
