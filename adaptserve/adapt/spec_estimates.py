"""What the speculation policy measures, as small estimators: a step-cost line, acceptance by draft
position, the expected tokens of a draft, a setting's step time per sequence, and the batch-size
buckets those are kept in. Plain data and arithmetic; the policy that reads them is
`adapt/speculation.py`."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class OnlineLinearCost:
    """seconds ≈ intercept + slope * tokens, least squares over recent steps (weights decay by
    `forget` per step, so the fit follows a machine that changes)."""

    forget: float = 0.97
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # w, wx, wy, wxx, wxy

    def add(self, tokens: float, seconds: float) -> None:
        w, wx, wy, wxx, wxy = (s * self.forget for s in self._sums)
        self._sums = [w + 1, wx + tokens, wy + seconds, wxx + tokens * tokens, wxy + tokens * seconds]

    @property
    def has_data(self) -> bool:
        return self._sums[0] > 0

    @property
    def weight(self) -> float:
        """The decayed count of steps behind the fit."""
        return self._sums[0]

    def coefficients(self) -> tuple[float, float]:
        """(intercept, slope); slope 0 until two different token counts were seen."""
        w, wx, wy, wxx, wxy = self._sums
        if w <= 0:
            return 0.0, 0.0
        mean_x, mean_y = wx / w, wy / w
        var_x = wxx / w - mean_x * mean_x
        if var_x <= 1e-9 * max(1.0, mean_x * mean_x):
            return mean_y, 0.0
        slope = max(0.0, (wxy / w - mean_x * mean_y) / var_x)
        return max(0.0, mean_y - slope * mean_x), slope

    def predict(self, tokens: float) -> float:
        intercept, slope = self.coefficients()
        return intercept + slope * tokens


@dataclass
class Acceptance:
    """Acceptance by draft position: `rates(k)[j]` is the chance that draft j + 1 is accepted given
    drafts 1..j were. Per position because drafts are not accepted independently: n-gram drafts
    copy runs of text, so once the first is accepted the next ones mostly are too, and one pooled
    rate misjudges how far to draft. Successes and trials per position, decayed by `forget` per
    update, with a prior of `prior_trials` at `parent`'s current rate for the position (a request's
    own acceptance leans on its drafter's global one); without a parent, at `prior` for the first
    position and at the position before's rate for the others. A position the current k does not
    reach forgets its trials and drifts to the one before it: with a fixed prior, the n-gram
    drafter's positions 5-8 sank to 0.5 while k=4 ran (0.83 at position 4), so k=8 looked 30 %
    worse than k=4 at batch 1 on the H100 and was never chosen, though it ran 3 % faster."""

    prior: float = 0.5
    parent: Acceptance | None = None
    prior_trials: float = 4.0
    forget: float = 0.9
    accepted: list[float] = field(default_factory=list)  # by position
    trials: list[float] = field(default_factory=list)  # by position: drafts tested there

    def add(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts > len(self.trials):
            grow = num_drafts - len(self.trials)
            self.accepted.extend([0.0] * grow)
            self.trials.extend([0.0] * grow)
        forget, accepted, trials = self.forget, self.accepted, self.trials
        tested = min(num_accepted + 1, num_drafts)  # tested up to the first rejection
        for j in range(len(trials)):
            trials[j] = trials[j] * forget + (j < tested)
            accepted[j] = accepted[j] * forget + (j < num_accepted)

    def rates(self, k: int) -> list[float]:
        """The first k positions' rates."""
        priors = self.parent.rates(k) if self.parent is not None else None
        rates, previous = [], self.prior
        for j in range(k):
            prior = priors[j] if priors is not None else previous
            accepted, trials = (self.accepted[j], self.trials[j]) if j < len(self.trials) else (0.0, 0.0)
            previous = min((accepted + prior * self.prior_trials) / (trials + self.prior_trials), 0.999)
            rates.append(previous)
        return rates

    def rate_at(self, position: int) -> float:
        return self.rates(position + 1)[position]

    @property
    def rate(self) -> float:
        """Pooled over positions: accepted drafts over drafts tested (for reports)."""
        prior = self.prior if self.parent is None else self.parent.rate
        rate = (sum(self.accepted) + prior * self.prior_trials) / (sum(self.trials) + self.prior_trials)
        return min(rate, 0.999)


def expected_tokens(alpha: float | Sequence[float], k: int) -> float:
    """Tokens a request gains in a step that verifies k drafts: 1 + the chance each draft is reached
    and accepted. `alpha`: one acceptance rate for every position, or one per position."""
    rates = [alpha] * k if isinstance(alpha, (int, float)) else list(alpha)
    total = reach = 1.0
    for rate in rates[:k]:
        reach *= min(float(rate), 1.0)
        total += reach
    return total


def draft_cut(acceptance: Acceptance, k: int, threshold: float) -> int:
    """k, or fewer: the drafts whose chance of being reached and accepted is at least `threshold`
    (always one: a drafting request tests a token, so its acceptance stays measured)."""
    return _cut(acceptance.rates(k), threshold)


def _cut(rates: list[float], threshold: float) -> int:
    j, reach = 1, rates[0]
    while j < len(rates) and reach * rates[j] >= threshold:
        reach *= rates[j]
        j += 1
    return j


def tokens_per_sequence(acceptance: Acceptance, hit_rate: float, k: int, threshold: float) -> float:
    """Expected tokens a sequence gains in a step that drafts up to k: h E(k') + 1 - h, where h is
    the chance the drafter finds a draft and k' is k after `draft_cut`."""
    rates = acceptance.rates(k)
    cut = _cut(rates, threshold)
    return hit_rate * expected_tokens(rates[:cut], cut) + 1 - hit_rate


def draft_lengths(max_draft: int) -> tuple[int, ...]:
    """The k an adaptive policy tries: powers of two below max_draft, and max_draft."""
    return tuple(sorted({k for k in (1, 2, 4, 8) if k < max_draft} | {max_draft}))


@dataclass
class ArmValue:
    """The step time per sequence of one arm in one batch bucket: the median of its last `WINDOW`
    steps (its tokens come from the drafter's acceptance, not from these steps). Per sequence, so
    that a neighbouring bucket's steps, at another batch size, still compare. A median, not a
    decayed mean: a step that captured a graph or compiled a kernel takes a hundred times the
    others, and the mean (decay 0.9) kept it for dozens of steps: k=8 at batch 1 on the H100 stayed
    at 80 % of k=4's value after its burst met a capture, and was not run again."""

    recent: deque = field(default_factory=lambda: deque(maxlen=ArmValue.WINDOW))
    samples: int = 0
    last_step: int = -1
    WINDOW: ClassVar[int] = 9

    def add(self, seconds_per_sequence: float) -> None:
        self.recent.append(seconds_per_sequence)
        self.samples += 1

    @property
    def steps(self) -> int:
        return len(self.recent)

    @property
    def seconds_per_sequence(self) -> float:
        """The median step seconds per sequence of the recent steps (0 before any)."""
        return statistics.median(self.recent) if self.recent else 0.0


def bucket_of(num_sequences: int) -> int:
    """Quarter-octave buckets of the batch size (1, 2, 3, ... 8 each alone; 16-18, 30-34, 128-143):
    per-sequence step time still moves with the batch where the device is not busy, so values
    measured at 17 and at 32 sequences, in one power-of-two bucket, did not compare."""
    return round(4 * math.log2(max(1, num_sequences)))


def neighbourhood(bucket: int) -> tuple[int, ...]:
    """The bucket, then the next smaller and the next larger batch size's buckets (small batches skip
    bucket numbers: 3 sequences are bucket 6, 4 are bucket 8)."""
    smallest = math.ceil(2 ** ((bucket - 0.5) / 4))  # the batch sizes in this bucket
    largest = math.ceil(2 ** ((bucket + 0.5) / 4)) - 1
    below = (bucket_of(smallest - 1),) if smallest > 1 else ()
    return (bucket, *below, bucket_of(largest + 1))
