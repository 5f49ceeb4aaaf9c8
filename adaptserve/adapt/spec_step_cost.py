"""What a speculation step costs: a line in the step's tokens (drafts included), each drafter's cost
beyond that line, and the filter that keeps one-off steps out of both. Read by the speculation
policy (`adapt/speculation.py`) for its predictions and its draft cut."""

from __future__ import annotations

from adaptserve.adapt.spec_estimates import OnlineLinearCost


class SpecStepCost:
    """seconds ≈ line(tokens) + draft_overhead[drafter] * units, learnt from every step."""

    def __init__(
        self, drafters: tuple[str, ...], outlier_factor: float = 4.0, max_outliers_in_a_row: int = 3
    ):
        self.line = OnlineLinearCost()  # every step, by its tokens (drafts included)
        # what a drafter's steps cost beyond the line: per sequence for lookups (host work with the
        # step drained), per drafted token for layer drafts (a partial pass each); exponentially
        # weighted
        self.draft_overhead = dict.fromkeys(drafters, 0.0)
        self.outlier_factor = outlier_factor  # see is_outlier
        self.max_outliers_in_a_row = max_outliers_in_a_row
        self.num_outliers = 0
        self._outliers_in_a_row = 0

    @property
    def has_data(self) -> bool:
        return self.line.has_data

    def predict(self, drafter: str, k: int, num_sequences: int, num_tokens: float) -> float:
        """Seconds of a step of `num_sequences` with `num_tokens` rows, drafting k with `drafter`
        (k = 0: a plain step)."""
        seconds = self.line.predict(num_tokens)
        if k:
            seconds += self.draft_overhead[drafter] * overhead_units(drafter, k, num_sequences)
        return seconds

    def row_share(self, num_sequences: int) -> float:
        """One more row's time, in plain steps' tokens: the line's slope times the batch over a plain
        step's time (0 before the line has data)."""
        if not self.line.has_data:
            return 0.0
        _, slope = self.line.coefficients()
        return slope * num_sequences / max(self.line.predict(num_sequences), 1e-9)

    def observe(self, drafter: str, k: int, num_sequences: int, num_tokens: int, seconds: float) -> bool:
        """Learn from a step; False when it is an outlier (learnt from nowhere: see is_outlier)."""
        if self.is_outlier(drafter, k, num_sequences, num_tokens, seconds):
            return False
        if not k:
            self.line.add(num_tokens, seconds)
            return True
        residual = seconds - self.line.predict(num_tokens) if self.line.has_data else 0.0
        units = overhead_units(drafter, k, num_sequences)
        overhead = self.draft_overhead[drafter] + 0.2 * (residual / units - self.draft_overhead[drafter])
        # never negative: a verify step cheaper than the line says the line overshoots at many
        # rows (on a CPU a GEMM's rows get cheaper as they grow), not that drafting saves time;
        # a negative overhead inflated every step the line learnt from (-44 ms per n-gram step)
        self.draft_overhead[drafter] = max(0.0, overhead)
        self.line.add(num_tokens, seconds - self.draft_overhead[drafter] * units)
        return True

    def is_outlier(self, drafter: str, k: int, num_sequences: int, num_tokens: int, seconds: float) -> bool:
        """A step over `outlier_factor` times what the line (and the drafter's overhead) predicts is a
        one-off, a graph captured or a kernel compiled on the step's first shape, not the arm's cost:
        on the H100, k=8's three-step burst at batch 1 probably met its graph's capture, measured
        1,209 tokens/s against k=4's 1,518, and was not run again though fixed k=8 beat k=4 by 10 %.
        A run of `max_outliers_in_a_row` is believed (the machine changed)."""
        if self.line.weight < 5 or self._outliers_in_a_row >= self.max_outliers_in_a_row:
            self._outliers_in_a_row = 0
            return False
        if seconds <= self.outlier_factor * self.predict(drafter, k, num_sequences, num_tokens):
            self._outliers_in_a_row = 0
            return False
        self._outliers_in_a_row += 1
        self.num_outliers += 1
        return True


def overhead_units(drafter: str, k: int, num_sequences: int) -> int:
    """Layer drafts and the draft model pay a pass per drafted token; a lookup's extra is per sequence
    (its lookup, its acceptance, its rolled-back slots, all on the host with the step drained). As
    one per step, the n-gram extra measured 0.06 ms at batch 1 and 0.53 ms at batch 8 on the H100,
    and k=1 at batch 128 was predicted at 0.86 of off and probed in every bucket: it ran at 0.44."""
    return k if drafter.startswith("layers") or drafter == "draft" else num_sequences
