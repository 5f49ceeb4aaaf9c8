"""Token-level weight precision (bf16 ⇄ fp8 ⇄ int4) chosen from logit confidence.

Decode steps where the model is sure of its next token tolerate coarser weights; steps where it hesitates
do not. `PrecisionController` turns one confidence score per step into a precision, with hysteresis,
patience and cooldown so a noisy score does not thrash, and two guardrails: memory pressure and the
measured top-1 agreement of `QualityMonitor`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from adaptserve.adapt.quality import QualityMonitor
from adaptserve.config import WEIGHT_FORMATS, ConfigError

__all__ = ["PRECISIONS", "PrecisionController", "PrecisionDecision", "PrecisionPolicyConfig"]

PRECISIONS = WEIGHT_FORMATS  # the controller's levels, high to low


def _default_down_thresholds() -> dict[str, float]:
    return {"fp8": 0.85, "int4": 0.95}


@dataclass(frozen=True)
class PrecisionPolicyConfig:
    available: tuple[str, ...] = PRECISIONS  # formats the runner holds: a subset of PRECISIONS, high to low
    down_thresholds: dict[str, float] = field(default_factory=_default_down_thresholds)  # score to run it
    up_margin: float = 0.05  # hysteresis: go back up when the score < current threshold - up_margin
    patience_steps: int = 4  # consecutive confident steps before stepping down one level
    cooldown_steps: int = 8  # min steps since the last switch before stepping down (upward moves ignore it)
    memory_high: float = 0.95  # memory pressure at or above which the lowest precision is forced
    memory_low: float = 0.85  # memory pressure at or below which that override is released
    max_backoff: int = 8  # after quality breaches patience doubles, up to patience_steps * max_backoff
    backoff_decay_steps: int = 256  # consecutive in-budget steps after which the backoff halves
    history_size: int = 256  # switches kept in PrecisionController.history

    def __post_init__(self) -> None:
        self._validate_levels()
        if not 0 <= self.up_margin < 1:
            raise ConfigError(f"precision.up_margin={self.up_margin} must be in [0, 1)")
        for name in ("patience_steps", "max_backoff", "backoff_decay_steps", "history_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"precision.{name}={getattr(self, name)} must be >= 1")
        if self.cooldown_steps < 0:
            raise ConfigError(f"precision.cooldown_steps={self.cooldown_steps} must be >= 0")
        if not 0 <= self.memory_low < self.memory_high:
            raise ConfigError(
                f"precision.memory_low={self.memory_low} must be in [0, memory_high={self.memory_high})"
            )

    def _validate_levels(self) -> None:
        available = tuple(self.available)
        if not available or any(p not in PRECISIONS for p in available):
            raise ConfigError(
                f"precision.available={self.available!r} must be a non-empty subset of {PRECISIONS}"
            )
        ranks = [PRECISIONS.index(p) for p in available]
        if ranks != sorted(set(ranks)):
            raise ConfigError(
                f"precision.available={self.available!r} must list each precision once, high to low"
            )
        unknown = set(self.down_thresholds) - set(PRECISIONS[1:])
        if unknown:
            raise ConfigError(
                f"precision.down_thresholds has unknown key(s) {sorted(unknown)}; known: {PRECISIONS[1:]}"
            )
        previous = 0.0
        for precision in available[1:]:
            threshold = self.down_thresholds.get(precision)
            if threshold is None:
                raise ConfigError(f"precision.down_thresholds needs a threshold for available {precision!r}")
            if not previous <= threshold <= 1:
                raise ConfigError(
                    f"precision.down_thresholds[{precision!r}]={threshold} must be in [{previous}, 1]: "
                    "a lower precision needs at least the confidence of a higher one"
                )
            previous = threshold


@dataclass(frozen=True, slots=True)
class PrecisionDecision:
    """Switch the weights to `precision`; `reason` is logged with the switch."""

    precision: str  # one of PRECISIONS
    reason: str  # e.g. "confident 12 steps", "uncertain 0.42", "memory pressure 0.97", "quality budget"


class PrecisionController:
    """Chooses the weight precision of the next decode step from the model's confidence.

    Signal: one confidence score in [0, 1] per decode step (`confidence_score`). The intended use is the
    minimum over the batch's sequences: all sequences of a step share the weights, so the least
    confident one decides. A NaN score counts as 0 (nothing known, so uncertain).
    Knob: the weight precision, one of `config.available` (high to low: bf16, fp8, int4). The controller
    starts at the highest.
    Thresholds: it steps down one level after `patience_steps` consecutive steps with
    score >= `down_thresholds[next level]`, once `cooldown_steps` have passed since the last switch. It
    steps up as soon as score < `down_thresholds[current] - up_margin`, straight to the lowest precision
    whose own threshold - up_margin the score still meets (one level for a mild dip, the highest for a
    sharp one). The `up_margin` gap is the hysteresis that keeps a noisy score near a threshold from
    switching back and forth.
    Guardrails, strongest first, each applied at once regardless of cooldown (only exploring downward
    waits):
      1. memory pressure >= `memory_high` forces the lowest available precision and holds it until the
         pressure is <= `memory_low`; then the normal rules resume. Running out of memory fails every
         request, which is worse than a quality miss, so this outranks the quality budget.
      2. while the quality monitor's agreement is below its budget only the highest precision runs.
         Each new breach doubles the patience (up to `max_backoff` times), and the patience halves
         again after `backoff_decay_steps` consecutive in-budget steps.

    Steps are numbered from 0 by the calls to `decide`; `history` keeps (step, precision, reason) of the
    last `history_size` switches.
    """

    def __init__(self, config: PrecisionPolicyConfig | None = None, quality: QualityMonitor | None = None):
        self.config = config or PrecisionPolicyConfig()
        self.quality = quality
        self.num_switches = 0
        self.history: deque[tuple[int, str, str]] = deque(maxlen=self.config.history_size)
        self._levels = tuple(self.config.available)  # high to low
        self._thresholds = (0.0,) + tuple(self.config.down_thresholds[p] for p in self._levels[1:])
        self._level = 0  # index into _levels
        self._step = -1
        self._last_switch_step: int | None = None
        self._num_confident_steps = 0  # consecutive steps with score >= the next level's threshold
        self._memory_override = False
        self._backoff = 1  # patience multiplier after quality breaches
        self._num_clean_steps = 0  # consecutive in-budget steps since the backoff last changed
        self._num_breaches_seen = quality.num_breaches if quality is not None else 0

    @property
    def precision(self) -> str:
        return self._levels[self._level]

    @property
    def patience(self) -> int:
        """Confident steps needed to step down now: `patience_steps` times the quality backoff."""
        return self.config.patience_steps * self._backoff

    def decide(self, score: float, memory_pressure: float = 0.0) -> PrecisionDecision | None:
        """The precision for the next step, or None to keep the current one.

        Call once per decode step with the batch's score (the minimum over its sequences) and the
        share of device memory in use.
        """
        self._step += 1
        if not math.isfinite(score):
            score = 0.0
        self._update_backoff()
        if self._memory_held(memory_pressure):
            return self._switch_to(len(self._levels) - 1, f"memory pressure {memory_pressure:.2f}")
        if self.quality is not None and not self.quality.within_budget:
            return self._switch_to(0, "quality budget")
        if score < self._thresholds[self._level] - self.config.up_margin:
            return self._switch_to(self._supported_level(score), f"uncertain {score:.2f}")
        return self._maybe_step_down(score)

    def _memory_held(self, memory_pressure: float) -> bool:
        if memory_pressure >= self.config.memory_high:
            self._memory_override = True
        elif memory_pressure <= self.config.memory_low:
            self._memory_override = False
        return self._memory_override

    def _update_backoff(self) -> None:
        if self.quality is None:
            return
        num_breaches = self.quality.num_breaches
        if num_breaches > self._num_breaches_seen:
            growth = 2 ** (num_breaches - self._num_breaches_seen)
            self._backoff = min(self._backoff * growth, self.config.max_backoff)
            self._num_breaches_seen = num_breaches
            self._num_clean_steps = 0
        elif not self.quality.within_budget or self._backoff == 1:
            self._num_clean_steps = 0
        else:
            self._num_clean_steps += 1
            if self._num_clean_steps >= self.config.backoff_decay_steps:
                self._backoff //= 2
                self._num_clean_steps = 0

    def _supported_level(self, score: float) -> int:
        """The lowest precision above the current one whose stay condition the score meets."""
        for level in range(self._level - 1, 0, -1):
            if score >= self._thresholds[level] - self.config.up_margin:
                return level
        return 0

    def _maybe_step_down(self, score: float) -> PrecisionDecision | None:
        next_level = self._level + 1
        if next_level == len(self._levels):
            return None
        if score < self._thresholds[next_level]:
            self._num_confident_steps = 0
            return None
        self._num_confident_steps += 1
        cooled_down = (
            self._last_switch_step is None
            or self._step - self._last_switch_step >= self.config.cooldown_steps
        )
        if self._num_confident_steps < self.patience or not cooled_down:
            return None
        return self._switch_to(next_level, f"confident {self._num_confident_steps} steps")

    def _switch_to(self, level: int, reason: str) -> PrecisionDecision | None:
        self._num_confident_steps = 0  # a guardrail or a switch restarts the count toward stepping down
        if level == self._level:
            return None
        self._level = level
        self._last_switch_step = self._step
        self.num_switches += 1
        self.history.append((self._step, self.precision, reason))
        return PrecisionDecision(self.precision, reason)
