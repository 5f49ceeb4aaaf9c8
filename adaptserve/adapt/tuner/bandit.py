"""A safe contextual bandit over knob settings: Thompson sampling inside a learned safe set.

Signal: the context vector of each snapshot (space.context_features); its load feature (arrival rate,
which the tuner's own choice does not move) picks a load bucket. Knobs: every knob of the action space,
set together as one arm. Per (bucket, arm) the tuner keeps
- a Gaussian posterior on the arm's mean window reward (prior: one pseudo-window at the bucket's mean
  reward, spread: the bucket's reward spread), sampled for Thompson exploration;
- a Beta posterior on P(the window breaks the guardrail), with a prior of `prior_breach` worth
  `prior_strength` windows. A StepCostModel, when given, raises that prior to `risky_prior_breach`
  for arms whose decode step at their max_num_seqs is predicted above the TPOT SLO, in buckets at or
  above `high_load`: those arms are not tried while load is high.
Thresholds: an arm is safe while its upper-confidence P(breach) (posterior mean + z·sd) is below
`breach_threshold` (2 %); only safe arms are sampled, and of those only arms already seen clean in the
bucket or one grid step (one knob, one value) away from such an arm, so exploration creeps outwards
from settings that are known to work instead of jumping to a far corner of the space. With the default
prior one breach makes an arm unsafe in that bucket unless some 50 clean windows speak for it.
Guardrail: after a window that broke the SLO or memory guardrail (reward.score_window), the next
decision rolls back at once to the last arm whose window was clean (or, if that arm broke it, the best
arm still safe), bypassing the cooldown. SwitchGuard only rate-limits other switches to one per window.

One decision window runs from a decision to the next `observe(outcomes, snapshot)`: the harness (the
simulator loop, the server's tuner loop) calls observe with the requests that finished in the window.
Until it does, `decide` keeps the arm in force and returns None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adaptserve.adapt.knobs import Decision
from adaptserve.adapt.snapshot import TelemetrySnapshot
from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.adapt.switch_guard import SwitchGuard
from adaptserve.adapt.tuner.reward import SLO, Guardrail, RewardWeights, WindowScore, score_window
from adaptserve.adapt.tuner.space import (
    LOAD_FEATURE,
    ActionSpace,
    ContextScales,
    KnobSetting,
    context_features,
)
from adaptserve.bench.metrics import RequestOutcome


@dataclass(frozen=True)
class BanditConfig:
    window_s: float = 5.0  # a decision window; also the SwitchGuard cooldown between two switches
    breach_threshold: float = 0.02  # explore an arm only while its upper-confidence P(breach) is below
    confidence_z: float = 1.645  # the upper bound is mean + z·sd of the Beta posterior (one-sided 95 %)
    prior_breach: float = 0.002  # prior P(breach) of an arm nothing speaks against
    prior_strength: float = 100.0  # windows' worth of evidence behind that prior
    risky_prior_breach: float = 0.5  # prior P(breach) of an arm the step-cost model predicts too slow
    load_edges: tuple[float, ...] = (1 / 3, 2 / 3)  # bucket edges on the load feature (0.5 = the scale)
    high_load: float = 1 / 3  # buckets from this load feature up apply the step-cost prior
    context_tokens: int = 512  # K/V tokens per running sequence the step-cost prior assumes
    min_reward_sd: float = 0.05  # floor on the reward spread, so a posterior never collapses to a point
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError(f"bandit window_s must be > 0, got {self.window_s}")
        if not 0 < self.breach_threshold < 1 or not 0 < self.prior_breach < 1:
            raise ValueError("bandit breach_threshold and prior_breach must be in (0, 1)")
        if not 0 < self.risky_prior_breach < 1 or not self.prior_strength > 0:
            raise ValueError("bandit risky_prior_breach must be in (0, 1) and prior_strength > 0")
        if list(self.load_edges) != sorted(self.load_edges):
            raise ValueError(f"bandit load_edges must be increasing, got {self.load_edges}")


@dataclass(frozen=True, slots=True)
class WindowRecord:
    """One decision window as the tuner saw it (for plots and tests)."""

    start: float  # engine clock at the decision
    arm: int
    mode: str  # explore | exploit | rollback | hold
    bucket: int  # load bucket of the context at the decision
    reward: float
    breach: bool
    reasons: tuple[str, ...]


class SafeBanditTuner:
    """A control-plane Controller over all the knobs of `space`; see the module docstring."""

    name = "tuner"

    def __init__(
        self,
        space: ActionSpace,
        slo: SLO,
        config: BanditConfig = BanditConfig(),
        cost_model: StepCostModel | None = None,
        scales: ContextScales | None = None,
        weights: RewardWeights | None = None,
        guardrail: Guardrail | None = None,
    ):
        self.space, self.slo, self.config = space, slo, config
        self.scales = scales or ContextScales()
        self.weights = weights or RewardWeights()
        self.guardrail = guardrail or Guardrail()
        num_buckets, num_arms = len(config.load_edges) + 1, len(space)
        # cooldown = one window; no cap beyond it (exploring switches about once a window by design)
        self.guard = SwitchGuard(cooldown_s=config.window_s, confirm=1, max_switches=10**9)
        self._rng = np.random.default_rng(config.seed)
        prior = np.full((num_buckets, num_arms), config.prior_breach)
        if cost_model is not None:
            high = [b for b in range(num_buckets) if self._bucket_floor(b) >= config.high_load]
            too_slow = [
                a for a, s in enumerate(space) if self.predicted_decode_step(cost_model, s) > slo.tpot_s
            ]
            prior[np.ix_(high, too_slow)] = config.risky_prior_breach
        self._prior_breaches = prior * config.prior_strength  # (bucket, arm) Beta alpha
        self._prior_clean = (1 - prior) * config.prior_strength  # (bucket, arm) Beta beta
        self._breaches = np.zeros((num_buckets, num_arms))
        self._clean = np.zeros((num_buckets, num_arms))
        self._count = np.zeros((num_buckets, num_arms))  # reward observations
        self._sum = np.zeros((num_buckets, num_arms))
        self._sum_sq = np.zeros((num_buckets, num_arms))
        self._neighbours = _grid_neighbours(space)  # (arm, arm) bool: one knob one grid step apart
        self.current: int | None = None  # arm in force
        self.last_good: int | None = None  # arm of the last window that kept the guardrail
        self._rollback_to: int | None = None
        self._last_decision = float("-inf")  # engine clock of the last decide()
        self._window: tuple[float, int, str, int] | None = None  # (start, arm, mode, bucket) in flight
        self.num_windows = 0
        self.num_breaches = 0
        self.num_explorations = 0  # windows that ran an arm chosen to explore
        self.exploration_breaches = 0  # of those, windows that broke the guardrail
        self.history: list[WindowRecord] = []

    # ---- the controller --------------------------------------------------------------------------

    def decide(self, snapshot: TelemetrySnapshot) -> Decision | None:
        if self._window is not None:
            return None  # the window in force has not been scored yet
        now = snapshot.time
        if now < self._last_decision:  # a new clock (a restarted engine, the next simulated trace)
            self.guard = SwitchGuard(cooldown_s=self.config.window_s, confirm=1, max_switches=10**9)
        self._last_decision = now
        in_force = self.space.index_of(snapshot.knobs)
        if in_force is not None and in_force != self.current:
            # first call, or someone else set the knobs (an operator, a restart): trust the snapshot
            self.current = in_force
            self.last_good = in_force if self.last_good is None else self.last_good
        bucket = self.bucket(context_features(snapshot, self.slo, self.scales))
        if self._rollback_to is not None:
            arm, mode = self._rollback_to, "rollback"
            reason = f"rollback to known-good {self.space[arm].label()} after a guardrail breach"
            self._rollback_to = None
        else:
            arm, mode, reason = self._choose(bucket, now)
        previous, self.current = self.current, arm
        self._window = (now, arm, mode, bucket)
        self.num_explorations += mode == "explore"
        if arm == previous:
            self.guard.reset()
            return None
        self.guard.switched(now)
        return Decision(self.space[arm].changes(), f"{mode}: {reason}", self.name)

    def observe(self, outcomes: Sequence[RequestOutcome], snapshot: TelemetrySnapshot) -> WindowScore | None:
        """Score the window in force from the requests that finished in it, learn from it, and plan a
        rollback if it broke the guardrail. None when no window was in force."""
        if self._window is None:
            return None
        start, arm, mode, bucket = self._window
        self._window = None
        duration = max(snapshot.time - start, 1e-3)
        score = score_window(outcomes, duration, self.slo, snapshot, self.weights, self.guardrail)
        self._count[bucket, arm] += 1
        self._sum[bucket, arm] += score.reward
        self._sum_sq[bucket, arm] += score.reward**2
        self.num_windows += 1
        if score.breach:
            self._breaches[bucket, arm] += 1
            self.num_breaches += 1
            self.exploration_breaches += mode == "explore"
            self._rollback_to = self._rollback_target(arm, bucket)
        else:
            self._clean[bucket, arm] += 1
            self.last_good = arm
        self.history.append(WindowRecord(start, arm, mode, bucket, score.reward, score.breach, score.reasons))
        return score

    # ---- the models ------------------------------------------------------------------------------

    def bucket(self, context: np.ndarray) -> int:
        return int(np.searchsorted(self.config.load_edges, context[LOAD_FEATURE], side="right"))

    def breach_upper(self, bucket: int) -> np.ndarray:
        """Per arm, the upper-confidence P(breach) in `bucket`: Beta posterior mean + z·sd."""
        a = self._prior_breaches[bucket] + self._breaches[bucket]
        b = self._prior_clean[bucket] + self._clean[bucket]
        mean = a / (a + b)
        sd = np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
        return mean + self.config.confidence_z * sd

    def reward_posterior(self, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """Per arm, the posterior mean and sd of its window reward in `bucket`. The prior is one
        pseudo-window at the bucket's mean reward with the bucket's spread (all buckets' while this one
        has fewer than two windows)."""
        count, total, total_sq = self._count[bucket], self._sum[bucket], self._sum_sq[bucket]
        if count.sum() < 2:
            count_all, total_all, sq_all = self._count.sum(0), self._sum.sum(0), self._sum_sq.sum(0)
        else:
            count_all, total_all, sq_all = count, total, total_sq
        n = count_all.sum()
        prior_mean = total_all.sum() / n if n else 0.0
        spread = math.sqrt(max(sq_all.sum() / n - prior_mean**2, 0.0)) if n >= 2 else 1.0
        spread = max(spread, self.config.min_reward_sd)
        return (prior_mean + total) / (1 + count), spread / np.sqrt(1 + count)

    def predicted_decode_step(self, cost_model: StepCostModel, setting: KnobSetting) -> float:
        """Seconds of a decode step with the arm's max_num_seqs sequences (and drafts) running."""
        values = setting.values
        seqs = values.get("max_num_seqs", 1)
        speculating = values.get("spec_mode", "off") != "off"
        tokens = seqs * (1 + (values.get("draft_len", 0) if speculating else 0))
        return cost_model.predict(
            tokens,
            seqs,
            seqs * self.config.context_tokens,
            values.get("precision_policy", "native"),
            values.get("kv_format", "bf16"),
        )

    # ---- helpers ---------------------------------------------------------------------------------

    def explorable(self, bucket: int) -> np.ndarray:
        """Per arm, whether it may be played in `bucket`: safe, and seen clean here or next to such an
        arm. A bucket with no clean arm yet grows from the arms seen clean anywhere and the arm in force."""
        safe = self.breach_upper(bucket) < self.config.breach_threshold
        known = safe & (self._clean[bucket] > 0)
        if not known.any():
            known = safe & (self._clean.sum(0) > 0)
            if self.current is not None:
                known[self.current] = safe[self.current]
        return safe & (known | self._neighbours[known].any(0))

    def _choose(self, bucket: int, now: float) -> tuple[int, str, str]:
        upper = self.breach_upper(bucket)
        safe = self.explorable(bucket)
        if not safe.any():
            arm = int(np.argmin(upper))
            return (
                arm,
                "exploit",
                f"no arm is safe at load bucket {bucket}; least risky, P(breach) <= {upper[arm]:.1%}",
            )
        mean, sd = self.reward_posterior(bucket)
        sample = np.where(safe, self._rng.normal(mean, sd), -np.inf)
        arm = int(np.argmax(sample))
        best = int(np.argmax(np.where(safe, mean, -np.inf)))
        current_safe = self.current is not None and bool(safe[self.current])
        if arm != self.current and current_safe and not self.guard.allow(now, arm):
            return self.current, "hold", "switch held by the cooldown"
        mode = "exploit" if arm == best else "explore"
        why = (
            f"{self.space[arm].label()}, reward ~{mean[arm]:.2f}, P(breach) <= {upper[arm]:.1%} "
            f"at load bucket {bucket}"
        )
        return arm, mode, why

    def _rollback_target(self, arm: int, bucket: int) -> int:
        if self.last_good is not None and self.last_good != arm:
            return self.last_good
        # the known-good arm itself broke it: the best arm still safe here, else the least risky
        upper = self.breach_upper(bucket)
        safe = self.explorable(bucket)
        safe[arm] = False
        if not safe.any():
            return int(np.argmin(upper))
        mean, _ = self.reward_posterior(bucket)
        return int(np.argmax(np.where(safe, mean, -np.inf)))

    def _bucket_floor(self, bucket: int) -> float:
        return 0.0 if bucket == 0 else self.config.load_edges[bucket - 1]


def _grid_neighbours(space: ActionSpace) -> np.ndarray:
    """(arm, arm) bool: True where two settings differ in one knob by one step of its sorted values."""
    grids = {name: sorted({s[name] for s in space}, key=_order) for name in space.knob_names}
    coords = np.array([[grids[n].index(s[n]) for n in space.knob_names] for s in space])  # [A, K]
    distance = np.abs(coords[:, None, :] - coords[None, :, :]).sum(-1)  # [A, A]
    return distance == 1


def _order(value) -> tuple:
    # numbers by value, choices (strings, booleans) by name: a grid only ever holds one kind
    return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))
