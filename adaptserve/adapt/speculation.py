"""How far to speculate: draft length per request and step (0 = off), from measured acceptance and
the measured cost of steps with and without drafts.

Signal: per-token acceptance alpha (the chance a draft is accepted given the ones before it were),
counted globally and per request with exponential forgetting; the drafter's hit rate (share of
requests it found a draft for); step time as a linear function of the step's tokens, fitted online
separately for plain steps and for steps that verify drafts (on a GPU the two differ most in their
intercept: verify steps run eagerly, plain decode steps replay CUDA graphs).

Knob: `draft_len` (the most drafts per request this step; Knobs.draft_len shows it as a gauge) and
each request's own k <= draft_len.

Rule: with k drafts a request yields E(k) = (1 - alpha^(k+1)) / (1 - alpha) tokens per step instead
of one. Speculation is on while the predicted tokens per second with drafts beat those without:
sum_r E_r(k_r) / t_spec(N + sum_r k_r) > B / t_plain(N). A request's j-th draft is worth its row when
alpha_r^j exceeds the step's marginal cost per token in tokens, b_spec * B / t_spec(N): at batch 1 on
a memory-bound GPU that threshold is tiny and long drafts pay; at large batches the step is compute
bound, b grows, and the drafts stop (the issue's "off when the batch is compute bound").

Guardrails: the on/off switch goes through a hysteresis band (on above +5 %, off below -5 % of the
plain rate) and a SwitchGuard (confirmation, cooldown, switch cap). While off, a probe step with drafts
runs every `probe_interval_s` so acceptance and cost stay measured; while on, a plain probe step does
the same for the plain cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptserve.adapt.switch_guard import Hysteresis, SwitchGuard


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
    """Per-token acceptance: successes (accepted drafts) over trials (drafts tested until the first
    rejection), both decayed by `forget` per update, with a prior of `prior_trials` at `prior`."""

    prior: float = 0.5
    prior_trials: float = 4.0
    forget: float = 0.9
    accepted: float = 0.0
    trials: float = 0.0

    def add(self, num_drafts: int, num_accepted: int) -> None:
        trials = num_accepted + (1 if num_accepted < num_drafts else 0)
        self.accepted = self.accepted * self.forget + num_accepted
        self.trials = self.trials * self.forget + trials

    @property
    def rate(self) -> float:
        rate = (self.accepted + self.prior * self.prior_trials) / (self.trials + self.prior_trials)
        return min(rate, 0.999)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a request gains in a step that verifies k drafts, each accepted with chance alpha."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class SpeculationPolicy:
    """Decides each step whether to draft, and how many tokens per request (see the module doc)."""

    def __init__(
        self,
        max_draft: int,
        adaptive: bool = True,
        probe_interval_s: float = 2.0,
        guard: SwitchGuard | None = None,
    ):
        self.max_draft = max_draft
        self.adaptive = adaptive
        self.probe_interval_s = probe_interval_s
        self.guard = guard or SwitchGuard(cooldown_s=1.0, confirm=3, max_switches=20, window_s=60.0)
        self.band = Hysteresis(low=0.95, high=1.05, is_high=True)  # ratio spec / plain, starts on
        self.enabled = True  # optimistic start: the first steps measure acceptance and cost
        self.global_acceptance = Acceptance()
        self.request_acceptance: dict[str, Acceptance] = {}
        self.hit_rate = 1.0  # share of requests the drafter found drafts for (decayed)
        self.plain_cost = OnlineLinearCost()
        self.spec_cost = OnlineLinearCost()
        self._last_probe = float("-inf")
        self.last_reason = "start"

    # ---- before a step -------------------------------------------------------------------------------

    def draft_budget(self, now: float, num_sequences: int) -> int:
        """The most drafts per request this step (0: a plain step)."""
        if not self.adaptive:
            return self.max_draft
        if num_sequences == 0:
            return 0
        self._update_switch(now, num_sequences)
        if self._last_probe == float("-inf"):
            self._last_probe = now  # the first probe comes one interval after the first step
        probing = now - self._last_probe >= self.probe_interval_s
        if probing:
            self._last_probe = now
        on = self.enabled != probing  # a probe runs the other kind of step
        return self.max_draft if on else 0

    def request_draft_len(self, request_id: str, budget: int, num_sequences: int) -> int:
        """This request's k <= budget: drafts while alpha_r^j beats the marginal cost threshold."""
        if budget <= 0 or not self.adaptive:
            return budget
        return self._draft_len(self._acceptance(request_id).rate, budget, num_sequences)

    def _draft_len(self, alpha: float, budget: int, num_sequences: int) -> int:
        threshold = self._marginal_threshold(num_sequences)
        k = 0
        while k < budget and alpha ** (k + 1) > threshold:
            k += 1
        return max(k, 1)  # a drafted request always tests at least one token (keeps alpha measured)

    # ---- after a step --------------------------------------------------------------------------------

    def observe_step(self, num_tokens: int, num_draft_tokens: int, seconds: float) -> None:
        cost = self.spec_cost if num_draft_tokens else self.plain_cost
        cost.add(num_tokens, seconds)

    def observe_request(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        self.global_acceptance.add(num_drafts, num_accepted)
        self._acceptance(request_id).add(num_drafts, num_accepted)

    def observe_proposals(self, num_asked: int, num_found: int) -> None:
        if num_asked:
            self.hit_rate = 0.9 * self.hit_rate + 0.1 * (num_found / num_asked)

    def forget(self, request_id: str) -> None:
        self.request_acceptance.pop(request_id, None)

    # ---- the model -----------------------------------------------------------------------------------

    def predicted_gain(self, num_sequences: int) -> float | None:
        """Predicted tokens/s with drafts over without, at this batch size; None before both step
        kinds were measured."""
        if not (self.plain_cost.has_data and self.spec_cost.has_data):
            return None
        alpha = self.global_acceptance.rate
        b = num_sequences
        k = self._draft_len(alpha, self.max_draft, num_sequences)  # a request at the global alpha
        drafted = self.hit_rate * b  # requests with a draft
        tokens_spec = drafted * expected_tokens(alpha, k) + (b - drafted)
        time_spec = self.spec_cost.predict(b + drafted * k)
        time_plain = self.plain_cost.predict(b)
        if time_spec <= 0 or time_plain <= 0:
            return None
        return (tokens_spec / time_spec) / (b / time_plain)

    def _update_switch(self, now: float, num_sequences: int) -> None:
        gain = self.predicted_gain(num_sequences)
        if gain is None:
            return
        wanted = self.band.update(gain)
        if wanted == self.enabled:
            self.guard.reset()
            return
        if self.guard.allow(now, wanted):
            self.guard.switched(now)
            self.enabled = wanted
            self.last_reason = (
                f"predicted speculative/plain tokens per second {gain:.2f} at batch {num_sequences}"
            )

    def _marginal_threshold(self, num_sequences: int) -> float:
        """Tokens one more drafted row must be expected to add to pay for its time."""
        if not self.spec_cost.has_data:
            return 0.0
        _, slope = self.spec_cost.coefficients()
        step = self.spec_cost.predict(num_sequences)
        return slope * num_sequences / step if step > 0 else 0.0

    def _acceptance(self, request_id: str) -> Acceptance:
        acceptance = self.request_acceptance.get(request_id)
        if acceptance is None:
            prior = self.global_acceptance.rate
            acceptance = self.request_acceptance[request_id] = Acceptance(prior=prior)
        return acceptance
