"""The control plane: asks each controller for a decision at a fixed cadence and applies what they
decide between engine steps, logging and counting every switch with its reason."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from adaptserve.adapt.knobs import Decision, Knobs, Switch, SwitchLog
from adaptserve.adapt.snapshot import TelemetrySnapshot

logger = logging.getLogger(__name__)


class Controller(Protocol):
    """A small strategy object that owns one or a few knobs. Its docstring states its signal, its
    knob, its thresholds and its guardrail."""

    name: str

    def decide(self, snapshot: TelemetrySnapshot) -> Decision | None: ...


class SnapshotSource(Protocol):
    def snapshot(self, now: float, knobs: Knobs) -> TelemetrySnapshot: ...


class ControlPlane:
    """Holds the Knobs in force. `after_step(now)` is called by the engine between steps; every
    `interval_s` it takes a snapshot, asks the controllers in order, and applies each decision through
    `apply(name, value)` (the engine's setter). Two controllers that want the same knob in one round:
    the first one wins, the other's change is dropped (and logged at debug level)."""

    def __init__(
        self,
        knobs: Knobs,
        controllers: Sequence[Controller],
        telemetry: SnapshotSource,
        apply: Callable[[str, Any], None],
        interval_s: float = 0.25,
    ):
        self.knobs = knobs
        self.controllers = list(controllers)
        self.telemetry = telemetry
        self._apply = apply
        self.interval_s = interval_s
        self.switches = SwitchLog()
        self.listeners: list[Callable[[Switch], None]] = []  # told of every applied switch (metrics)
        self._next_round = float("-inf")
        self.last_snapshot: TelemetrySnapshot | None = None
        self.step_cost = None  # the OnlineStepCost the controllers share, when one runs (factory.py)

    def after_step(self, now: float) -> list[Switch]:
        if now < self._next_round or not self.controllers:
            return []
        self._next_round = now + self.interval_s
        snapshot = self.telemetry.snapshot(now, self.knobs)
        self.last_snapshot = snapshot
        applied: list[Switch] = []
        taken: set[str] = set()
        for controller in self.controllers:
            decision = controller.decide(snapshot)
            if decision is None:
                continue
            for name, value in decision.changes.items():
                if name in taken:
                    logger.debug(
                        "%s: %s=%r dropped, already decided this round", controller.name, name, value
                    )
                    continue
                taken.add(name)  # also when unchanged: the earlier controller keeps it where it is
                if value == getattr(self.knobs, name):
                    continue
                applied.append(self.set(name, value, controller.name, decision.reason, now))
        return applied

    def set(self, name: str, value: Any, controller: str, reason: str, now: float) -> Switch:
        """Apply one knob change now (controllers, the tuner and the admin API all come through here)."""
        old = getattr(self.knobs, name)
        Decision({name: value}, reason)  # validates the value
        self._apply(name, value)
        setattr(self.knobs, name, value)
        switch = Switch(now, name, old, value, controller, reason)
        self.switches.add(switch)
        logger.info("knob %s: %r -> %r by %s (%s)", name, old, value, controller, reason)
        for listener in self.listeners:
            listener(switch)
        return switch
