"""Which drafter and how far to speculate, each step, from measured acceptance and measured step cost.

Signal (the estimators are in `adapt/spec_estimates.py` and `adapt/spec_step_cost.py`): each
drafter's acceptance by draft position (the chance draft j is accepted given the ones before it
were), globally and per request, with exponential forgetting; each drafter's hit rate (share of
requests it found a draft for: n-gram lookup can miss, a layer draft cannot); step time as a line in
the step's tokens plus each drafter's overhead, with one-off steps (graph captures, compiles) left
out; and each (drafter, k) setting's step time per sequence (the median of its recent steps), per
quarter-octave batch-size bucket.

Knob: the step's arm, (drafter, k) or off; Knobs.draft_len shows k. Each request's own k is at most
the arm's k: its j-th draft is dropped when the chance of reaching and accepting it falls below
what a row costs, measured as the step-time line's slope times the batch over the step's time (a
draft row is worth its chance of being accepted only if that chance beats the tokens the row's
time would have produced), bounded by `min_draft_floor` below and `min_draft_accept` above. A
memory-bound step (a GPU at batch 1) pays almost nothing per row, so long drafts stay; a
compute-bound one cuts them.

Rule: with k drafts a request yields E(k) = 1 + the sum over j of the chance that drafts 1..j are
all accepted. An arm's value at a batch size is (h E(k') + 1 - h) tokens per sequence over its
measured step time per sequence in that bucket once it has `min_samples` steps there (k' is k
after the draft cut), else the model's prediction from the step-cost line. Tokens come from the
acceptance, which every verified draft of every arm measures, not from the arm's own few steps: at
batch 1 a step's accepted count swings 1 to k + 1, and a mean over ten steps of it was noisier than
the gaps between arms. Arms are compared within one bucket (off joins from a neighbour); each
bucket remembers its arm. The best arm wins; the current one is kept while it is within
`keep_margin` of the best, so noise does not make the knob move. At large batches the step is
compute bound: drafts cost their full share of the step, and "off" delivers the most.

Graph rows: with `max_rows` set (the decode graphs' rows on a GPU), an arm whose verify step would
have more rows than that at this batch size (B (k + 1)) is not run there: such a step launches every
kernel from Python, a cliff the step-cost line does not see (on the H200 at batch 128, k = 4 and
k = 8 ran eagerly at 3x a plain step's time). The current arm falls back to its drafter's longest k
that fits, or off.

Guardrails: a switch within a bucket needs `confirm` consecutive steps proposing it and a cooldown
since the last one (the shared SwitchGuard, counting steps, not seconds); every `probe_every` steps
a short burst runs the least recently measured arm that the model does not rule out, so values stay
current as acceptance and load change. A probe that measures its arm worse than the current one
doubles how long that arm waits for its next probe at that batch size (up to `max_backoff` times),
so where one arm is clearly best (speculation off at a large batch) exploration costs next to
nothing; a probe that comes close resets the wait. Off is always measured.
"""

from __future__ import annotations

from adaptserve.adapt.spec_estimates import (
    Acceptance,
    ArmValue,
    bucket_of,
    draft_cut,
    draft_lengths,
    neighbourhood,
    tokens_per_sequence,
)
from adaptserve.adapt.spec_step_cost import SpecStepCost
from adaptserve.adapt.switch_guard import SwitchGuard

OFF = ("", 0)  # the arm that drafts nothing


class SpeculationPolicy:
    """Picks each step's (drafter, k); see the module doc."""

    def __init__(
        self,
        drafters: tuple[str, ...],
        max_draft: int,
        adaptive: bool = True,
        probe_every: int = 64,
        min_samples: int = 3,
        keep_margin: float = 0.05,
        min_draft_accept: float = 0.1,
        min_draft_floor: float = 0.02,
        guard: SwitchGuard | None = None,
        max_backoff: int = 32,
        probe_floor: float = 0.5,
        probe_at_once: float = 0.8,
        max_rows: int | None = None,
        outlier_factor: float = 4.0,
        max_outliers_in_a_row: int = 3,
    ):
        self.drafters = drafters
        self.max_draft = max_draft
        self.adaptive = adaptive
        self.arms = [OFF] + [(d, k) for d in drafters for k in draft_lengths(max_draft)]
        self.max_rows = max_rows  # a verify step's most rows (None: no limit); see the module doc
        self._arms_now = self.arms  # the arms whose verify rows fit this step's batch
        self.probe_every = probe_every  # steps between probe bursts (~5 % of steps probe)
        self.min_samples = min_samples
        self.keep_margin = keep_margin
        self.min_draft_accept = min_draft_accept
        self.min_draft_floor = min_draft_floor
        self.draft_threshold = min_draft_accept  # set per step by choose() from the step's cost
        # the guard's clock is the step count: a GPU step at batch 1 takes about a millisecond, a CPU
        # one tens, so a cooldown in seconds meant hundreds of steps on one and a few on the other
        self.guard = guard or SwitchGuard(cooldown_s=8, confirm=3, max_switches=30, window_s=1000)
        self.current = (drafters[0], max_draft)  # optimistic start: the first steps measure it
        # global: every verified request updates it, so it forgets per update slowly (~100 updates)
        self.acceptance = {d: Acceptance(forget=0.99) for d in drafters}
        self.request_acceptance: dict[tuple[str, str], Acceptance] = {}
        self.hit_rate = dict.fromkeys(drafters, 1.0)
        self.cost = SpecStepCost(drafters, outlier_factor, max_outliers_in_a_row)  # what steps cost
        self.values: dict[tuple[int, tuple[str, int]], ArmValue] = {}
        self.last_reason = "start"
        self._step = 0
        self._last_probe = 0  # the step of the last probe burst
        self._probing: tuple[str, int] | None = None
        self._probe_steps_left = 0
        self.max_backoff = max_backoff
        self.probe_floor = probe_floor  # probe no arm the model predicts below this share of the best
        self.probe_at_once = probe_at_once  # a never-measured arm predicted above this share: now
        # (bucket, arm) -> how many probe_every periods the arm waits between probes at that bucket
        self.backoff: dict[tuple[int, tuple[str, int]], int] = {}
        self._judge: tuple[int, tuple[str, int]] | None = None  # a finished burst to judge
        self._burst = ArmValue()  # the current or last probe burst's own steps
        self._burst_arm: tuple[str, int] | None = None
        self._check = False  # the running probe is a one-step check of an arm measured before
        self._extend: tuple[str, int] | None = None  # a check that came close: burst it next step
        self._bucket: int | None = None  # the batch bucket of the last step
        self._chosen: dict[int, tuple[str, int]] = {}  # bucket -> the arm it last ran as current
        self._last_observed: tuple[str, int] | None = None  # the arm of the last step observed
        # arm -> expected tokens per sequence, kept until acceptance, hit rate or threshold move (a
        # step reads it for every arm in up to three buckets: worked out once, not dozens of times)
        self._tokens: dict[tuple[str, int], float] = {}
        self._known_in: dict[int, dict[tuple[str, int], float]] = {}  # bucket -> _known, this step

    # ---- before a step -------------------------------------------------------------------------------

    def choose(self, now: float, num_sequences: int) -> tuple[str, int]:
        """(drafter, k) for the coming step; ("", 0) runs it without drafts. `now` is not read: the
        policy's clock is its step count."""
        self._step += 1
        if not self.adaptive:
            return self.current
        if num_sequences == 0:
            return OFF
        self.draft_threshold = self._draft_threshold(num_sequences)
        self._tokens.clear()
        self._known_in.clear()
        self._arms_now = [arm for arm in self.arms if self.fits(arm, num_sequences)]
        bucket = bucket_of(num_sequences)
        if bucket != self._bucket:
            self._enter_bucket(bucket)
        self._update_current(bucket, num_sequences)
        if self.current not in self._arms_now:
            self.current = self._longest_fitting(self.current[0])
        self._chosen[bucket] = self.current
        self._judge_probe()
        self._probing = self._probe(bucket, num_sequences)
        return self._probing or self.current

    def fits(self, arm: tuple[str, int], num_sequences: int) -> bool:
        """Whether the arm's verify step at this batch size has at most `max_rows` rows."""
        return self.max_rows is None or not arm[1] or num_sequences * (arm[1] + 1) <= self.max_rows

    def _longest_fitting(self, drafter: str) -> tuple[str, int]:
        fitting = [arm for arm in self._arms_now if arm[0] == drafter and arm[1]]
        return max(fitting, key=lambda arm: arm[1]) if fitting else OFF

    def request_draft_len(self, drafter: str, request_id: str, k: int) -> int:
        """This request's k: the arm's k, cut where its own chance of reaching and accepting a draft
        drops below `draft_threshold`."""
        if k <= 0 or not self.adaptive:
            return k
        return draft_cut(self._request_acceptance(drafter, request_id), k, self.draft_threshold)

    # ---- after a step --------------------------------------------------------------------------------

    def observe_step(self, arm: tuple[str, int], num_sequences: int, num_tokens: int, seconds: float) -> None:
        if seconds <= 0 or num_sequences == 0:
            return
        drafter, k = arm
        if not self.cost.observe(drafter, k, num_sequences, num_tokens, seconds):
            return  # a one-off step (SpecStepCost.is_outlier): not the arm's cost either
        # the first plain step after a verify step cannot hide its host work behind a step before
        # it: a pipeline refill, paid once per switch, that a three-step probe of off would count
        # as a third of its time
        refill = arm == OFF and self._last_observed not in (None, OFF)
        self._last_observed = arm
        if refill:
            return
        if arm == self._burst_arm:
            self._burst.add(seconds / num_sequences)
        value = self.values.setdefault((bucket_of(num_sequences), arm), ArmValue())
        value.add(seconds / num_sequences)
        value.last_step = self._step

    def observe_request(self, drafter: str, request_id: str, num_drafts: int, num_accepted: int) -> None:
        self.acceptance[drafter].add(num_drafts, num_accepted)
        self._request_acceptance(drafter, request_id).add(num_drafts, num_accepted)
        self._tokens.clear()

    def observe_proposals(self, drafter: str, num_asked: int, num_found: int) -> None:
        if num_asked:
            self.hit_rate[drafter] = 0.9 * self.hit_rate[drafter] + 0.1 * (num_found / num_asked)
            self._tokens.clear()

    def forget(self, request_id: str) -> None:
        for key in [key for key in self.request_acceptance if key[1] == request_id]:
            del self.request_acceptance[key]

    def describe(self) -> dict:
        """The measured values, tokens/s and samples per "bucket|arm", the global acceptance and hit
        rates, the step-cost line and the last switch's reason (for benchmarks and debugging)."""
        intercept, slope = self.cost.line.coefficients()
        return {
            "values": {
                f"{bucket}|{_name(arm)}": [
                    round(self._tokens_per_sequence(arm) / v.seconds_per_sequence),
                    v.samples,
                ]
                for (bucket, arm), v in sorted(self.values.items())
                if v.seconds_per_sequence > 0  # every sample, not only buckets with min_samples
            },
            "acceptance": {d: round(a.rate, 4) for d, a in self.acceptance.items()},
            "acceptance_by_position": {
                d: [round(r, 3) for r in a.rates(self.max_draft)] for d, a in self.acceptance.items()
            },
            "hit_rate": {d: round(h, 4) for d, h in self.hit_rate.items()},
            "step_cost_ms": [round(intercept * 1e3, 4), round(slope * 1e3, 6)],
            "draft_overhead_ms": {d: round(o * 1e3, 4) for d, o in self.cost.draft_overhead.items()},
            "outlier_steps": self.cost.num_outliers,
            "last_reason": self.last_reason,
        }

    # ---- values --------------------------------------------------------------------------------------

    def value(self, arm: tuple[str, int], num_sequences: int) -> float | None:
        """Tokens/s the arm delivers at this batch size: measured when it has enough steps in the
        bucket, else predicted; None when neither is possible yet."""
        measured = self._measured(bucket_of(num_sequences), arm)
        return measured if measured is not None else self.predicted(arm, num_sequences)

    def predicted(self, arm: tuple[str, int], num_sequences: int) -> float | None:
        drafter, k = arm
        batch = num_sequences
        if not self.cost.has_data:
            return None
        if not k:
            return batch / max(self.cost.predict("", 0, batch, batch), 1e-9)
        tokens = batch * self._tokens_per_sequence(arm)
        seconds = self.cost.predict(drafter, k, batch, batch + self.hit_rate[drafter] * batch * k)
        return tokens / max(seconds, 1e-9)

    def _measured(self, bucket: int, arm: tuple[str, int]) -> float | None:
        """Measured tokens/s at this batch size: from this bucket, else from the next smaller or
        larger one (values are kept per sequence, so a batch that shrinks as requests finish reuses
        what its neighbours measured); None when none has `min_samples` steps."""
        for near in neighbourhood(bucket):
            value = self._value_in(near, arm)
            if value is not None:
                return value
        return None

    def _value_in(self, bucket: int, arm: tuple[str, int]) -> float | None:
        """Tokens/s of the arm from this bucket's own steps (B tokens over B seconds per sequence), or
        None before it has `min_samples` there."""
        value = self.values.get((bucket, arm))
        if value is None or value.samples < self.min_samples or value.seconds_per_sequence <= 0:
            return None
        return self._tokens_per_sequence(arm) / value.seconds_per_sequence

    def _known(self, bucket: int) -> dict[tuple[str, int], float]:
        """The arms measured in one bucket, tokens/s each: of this bucket and its two neighbours, the
        one with the most arms that have `min_samples` there (the nearest on a tie). Arms are
        compared within one bucket: per-sequence step time still falls with the batch where the
        device is not yet busy, so off measured at 50 sequences lost to k=1 measured at 100 that
        was slower at both. Off, the baseline, joins from a neighbour when that bucket lacks it (on
        the H100, k=2 ran at batch 49 for want of off there, with off 30 % faster one bucket up).
        Worked out once per bucket and step (the values move only when a step is observed)."""
        if bucket in self._known_in:
            return self._known_in[bucket]
        best: dict[tuple[str, int], float] = {}
        for near in neighbourhood(bucket):
            known = {arm: v for arm in self._arms_now if (v := self._value_in(near, arm)) is not None}
            if len(known) > len(best):
                best = known
        if best and OFF not in best:  # the baseline: off from the nearest bucket that measured it
            off = self._measured(bucket, OFF)
            if off is not None:
                best[OFF] = off
        self._known_in[bucket] = best
        return best

    def _tokens_per_sequence(self, arm: tuple[str, int]) -> float:
        """Expected tokens a sequence gains in a step of this arm, its k cut at the drafter's
        acceptance as request_draft_len cuts each request's (memoized in `_tokens`)."""
        drafter, k = arm
        if not k:
            return 1.0
        if arm not in self._tokens:
            threshold = self.draft_threshold if self.adaptive else 0.0  # fixed: every draft runs
            acceptance, hit = self.acceptance[drafter], self.hit_rate[drafter]
            self._tokens[arm] = tokens_per_sequence(acceptance, hit, k, threshold)
        return self._tokens[arm]

    def _enter_bucket(self, bucket: int) -> None:
        """The batch size moved to another bucket (a pass arrived, requests finished): take the arm
        this bucket last ran unless its best measured one beats it by more than `keep_margin`, at
        once. The guard holds back noise within a bucket; a new batch size is not noise, and the
        guard's steps at a 128-sequence step cost more than the switch they guard (a pass that
        started at batch 128 on batch 1's k=8 ran 8 steps at a quarter of off's speed)."""
        self._bucket = bucket
        # a probe burst measures one batch size: one cut short by the move is dropped, not judged
        self._probing, self._probe_steps_left, self._burst_arm, self._judge = None, 0, None, None
        self._check, self._extend = False, None
        self.current = self._chosen.get(bucket, self.current)
        known = self._known(bucket)
        if len(known) >= 2:
            best = max(known, key=known.get)
            if known.get(self.current, 0.0) < (1 - self.keep_margin) * known[best]:
                self.current = best
        self.guard.reset()

    def _update_current(self, bucket: int, num_sequences: int) -> None:
        """Switch to the best *measured* arm (predictions only decide what to measure)."""
        known = self._known(bucket)
        if not known:
            return
        best = max(known, key=known.get)
        current = known.get(self.current)
        if current is None and len(known) < 2:
            return  # one measured arm against an unmeasured current one: no comparison yet
        if best == self.current or (current is not None and current >= (1 - self.keep_margin) * known[best]):
            self.guard.reset()
            return
        if self.guard.allow(self._step, best):
            self.guard.switched(self._step)
            previous, self.current = self.current, best
            self.last_reason = (
                f"batch {num_sequences}: {_name(best)} {known[best]:.1f} tokens/s over "
                f"{_name(previous)} {current if current is None else round(current, 1)}"
            )

    def _probe(self, bucket: int, num_sequences: int) -> tuple[str, int] | None:
        """A burst of `min_samples` steps (enough for a value to count) of an arm worth measuring:
        at once for an arm never measured at this batch size that the model rates at least
        `probe_at_once` of the current arm, else every `probe_every` steps for the most promising
        one (measured or predicted) not probed lately. An arm is not worth it when the model
        predicts under `probe_floor` (half) of the current arm's tokens/s."""
        if self._probing is not None and self._probe_steps_left > 0:
            self._probe_steps_left -= 1
            if not self._probe_steps_left:
                self._judge = (bucket, self._probing)  # its last step: judge it once measured
            return self._probing
        if self._extend is not None:  # a one-step check came close: the rest of a full burst
            arm, self._extend = self._extend, None
            if arm in self._arms_now:
                self._probe_steps_left = self.min_samples - 2  # the check was its first step
                self._burst_arm = arm
                if not self._probe_steps_left:
                    self._judge = (bucket, arm)
                return arm
        best = self.value(self.current, num_sequences) or 0.0
        candidates = []
        for arm in self._arms_now:
            if arm == self.current:
                continue
            predicted = self.predicted(arm, num_sequences)
            if arm != OFF and predicted is not None and predicted < self.probe_floor * best:
                continue  # the model rules it out (never off: its line may come from draft steps alone)
            nearby = [v for near in neighbourhood(bucket) if (v := self.values.get((near, arm)))]
            last_step = max((v.last_step for v in nearby), default=-1)
            measured_value = self._measured(bucket, arm)
            promise = max(v for v in (predicted, measured_value, 0.0) if v is not None)
            candidates.append((last_step, -promise, arm, measured_value is not None))
        if not candidates:
            return None
        # not yet measured here (under min_samples: a burst over prompt steps reports nothing): off,
        # and arms the model rates close to the current one, at once; one rated lower waits for a
        # regular probe (three steps of k=8 at batch 128 cost twelve plain ones)
        never = [c for c in candidates if not c[3] and (c[2] == OFF or -c[1] >= self.probe_at_once * best)]
        if never:
            arm = min(never)[2]
        elif self._step - self._last_probe < self.probe_every:
            return None
        else:  # the most promising arm not probed in its last two waits, else the stalest one due
            due = [c for c in candidates if self._step - c[0] >= self.probe_every * self._wait(bucket, c[2])]
            if not due:
                return None
            stale = [c for c in due if self._step - c[0] >= 2 * self.probe_every * self._wait(bucket, c[2])]
            arm = min(stale, key=lambda c: c[1])[2] if stale else min(due)[2]
        self._last_probe = self._step
        # an arm measured here before is checked with one step first (its step time is steady; the
        # tokens come from acceptance): a full burst only if the check comes close to the current
        # arm, so re-probing an arm that stays worse (k=1 at batch 128) costs one step, not three
        self._check = arm != OFF and self.min_samples > 1 and self._measured(bucket, arm) is not None
        self._probe_steps_left = 0 if self._check else self.min_samples - 1
        self._burst, self._burst_arm = ArmValue(), arm
        if not self._probe_steps_left:
            self._judge = (bucket, arm)
        return arm

    def _draft_threshold(self, num_sequences: int) -> float:
        """The acceptance chance a draft row must beat: a row's time (the cost line's slope) in the
        tokens a plain step makes in that time, within [min_draft_floor, min_draft_accept]."""
        if not self.cost.has_data:
            return self.min_draft_accept
        return min(self.min_draft_accept, max(self.min_draft_floor, self.cost.row_share(num_sequences)))

    def _wait(self, bucket: int, arm: tuple[str, int]) -> int:
        return self.backoff.get((bucket, arm), 1)

    def _judge_probe(self) -> None:
        """After a burst: an arm measured clearly worse than the current one waits twice as long for
        its next probe at this bucket; one within `keep_margin` (or better) waits the base period."""
        if self._judge is None or self._probing is not None and self._probe_steps_left > 0:
            return
        (bucket, arm), self._judge = self._judge, None
        self._burst_arm = None
        # the burst's own step time (old values decay slowly), with tokens from alpha
        probed = self._tokens_per_sequence(arm) / max(self._burst.seconds_per_sequence, 1e-12)
        current = self._measured(bucket, self.current)
        check, self._check = self._check, False
        if not self._burst.steps or current is None or arm == self.current:
            return
        if check and probed >= (1 - self.keep_margin) * current:
            self._extend = arm  # close: measure it with a full burst before it may take over
            return
        if probed < (1 - self.keep_margin) * current:
            self.backoff[(bucket, arm)] = min(self.max_backoff, 2 * self._wait(bucket, arm))
        else:
            self.backoff.pop((bucket, arm), None)

    def _request_acceptance(self, drafter: str, request_id: str) -> Acceptance:
        key = (drafter, request_id)
        acceptance = self.request_acceptance.get(key)
        if acceptance is None:
            acceptance = self.request_acceptance[key] = Acceptance(parent=self.acceptance[drafter])
        return acceptance


def _name(arm: tuple[str, int]) -> str:
    return "off" if not arm[1] else f"{arm[0]} k={arm[1]}"
