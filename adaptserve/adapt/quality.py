"""The quality guardrail of dynamic precision: top-1 agreement between low and high precision."""

from __future__ import annotations

import random
from collections import deque

from adaptserve.config import ConfigError

__all__ = ["QualityMonitor"]


class QualityMonitor:
    """Shadows a sample of low-precision steps in high precision; tracks top-1 agreement in a window.

    Signal: for a shadowed step, how many sequences got the same top-1 token from the low-precision and
    the high-precision weights (`record`). The engine asks `should_shadow()` once per low-precision step
    (a seeded Bernoulli(`shadow_rate`) draw) and, when it says yes, runs the step again in high precision.
    While the precision controller holds the highest precision because of a breach, the engine keeps
    sampling steps the other way round (serve high, shadow low) so the window can recover.

    Window: the last `window` tokens (sequences of shadowed steps), not steps, so a large batch counts for
    more evidence. Within one step the disagreeing tokens count as the newest, so when the window cuts a
    step in two it drops that step's agreements first (the conservative choice).

    Guardrail: `within_budget` is agreement >= `budget`. Until `min_samples` tokens have been seen the
    agreement reads 1.0: too little evidence to call a breach. `num_breaches` counts the times the
    monitor went from within budget to out of it; the controller backs off on each one.
    """

    def __init__(
        self,
        budget: float = 0.99,
        window: int = 256,
        shadow_rate: float = 0.1,
        min_samples: int = 32,
        seed: int = 0,
    ) -> None:
        if not 0 < budget <= 1:
            raise ConfigError(f"quality.budget={budget} must be in (0, 1]")
        if window < 1:
            raise ConfigError(f"quality.window={window} must be >= 1")
        if not 0 <= shadow_rate <= 1:
            raise ConfigError(f"quality.shadow_rate={shadow_rate} must be in [0, 1]")
        if not 1 <= min_samples <= window:
            raise ConfigError(f"quality.min_samples={min_samples} must be in [1, window={window}]")
        self.budget = budget
        self.window = window
        self.shadow_rate = shadow_rate
        self.min_samples = min_samples
        self._rng = random.Random(seed)
        self._agreed: deque[bool] = deque(maxlen=window)  # one entry per shadowed token, oldest first
        self._num_agree = 0  # agreeing tokens in the window
        self._num_breaches = 0
        self._was_within_budget = True

    def should_shadow(self) -> bool:
        """Whether to shadow this step in the other precision: a seeded Bernoulli(shadow_rate) draw."""
        return self._rng.random() < self.shadow_rate

    def record(self, num_agree: int, num_total: int) -> None:
        """One shadowed step: `num_agree` of its `num_total` sequences had the same top-1 token."""
        if num_total < 0 or not 0 <= num_agree <= num_total:
            raise ValueError(f"record needs 0 <= num_agree <= num_total, got {num_agree} and {num_total}")
        for agreed in [True] * num_agree + [False] * (num_total - num_agree):
            if len(self._agreed) == self.window:
                self._num_agree -= self._agreed[0]  # the deque drops this one on append
            self._agreed.append(agreed)
            self._num_agree += agreed
        within = self.within_budget
        if self._was_within_budget and not within:
            self._num_breaches += 1
        self._was_within_budget = within

    @property
    def num_samples(self) -> int:
        """Tokens in the window."""
        return len(self._agreed)

    @property
    def agreement(self) -> float:
        """Share of agreeing tokens in the window; 1.0 until `min_samples` tokens have been recorded."""
        if len(self._agreed) < self.min_samples:
            return 1.0
        return self._num_agree / len(self._agreed)

    @property
    def within_budget(self) -> bool:
        return self.agreement >= self.budget

    @property
    def num_breaches(self) -> int:
        """Times the agreement fell below the budget (each fall counts once, however long it lasts)."""
        return self._num_breaches
