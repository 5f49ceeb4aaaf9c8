"""Adaptive batching and chunked prefill: the step's token budget, the prefill chunk, the running-
sequence cap and the batch wait, set from the TPOT SLO and the measured step-time model.

Every step that carries decodes adds its whole length to each decode's inter-token gap, so a step must
end within the TPOT SLO (times a safety margin). The controller asks the step cost model how many
tokens fit in that time beside the decodes now running and their contexts (stall-free batching: a
long prefill is cut into chunks that fit, decodes are never starved) and grows the budget when there
is slack. Signals, knobs, thresholds and guardrails are in `BatchingController`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptserve.adapt.knobs import Decision
from adaptserve.adapt.snapshot import TelemetrySnapshot
from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.adapt.switch_guard import SwitchGuard


@dataclass(frozen=True)
class BatchingTargets:
    """The SLOs and limits the controller works to."""

    tpot_slo_s: float = 0.1  # time per output token every request must meet
    ttft_slo_s: float = 2.0  # time to first token every request must meet
    safety: float = 0.8  # a step may use this share of the TPOT SLO (room for noise and host work)
    min_budget: int = 64  # never fewer tokens per step than this ...
    max_budget: int = 2048  # ... nor more than this (the configured ceiling: memory was sized for it)
    min_seqs: int = 4  # never fewer running sequences than this ...
    max_seqs: int = 64  # ... nor more than this (the configured ceiling: CUDA graphs were sized for it)
    quantum: int = 64  # budgets are multiples of this, so tiny model drifts do not move the knob
    change_ratio: float = 0.2  # hysteresis: a new budget/cap must differ by this share to be proposed

    def __post_init__(self) -> None:
        if not (self.tpot_slo_s > 0 and self.ttft_slo_s > 0 and 0 < self.safety <= 1):
            raise ValueError("batching targets need tpot_slo_s > 0, ttft_slo_s > 0 and safety in (0, 1]")
        if not (1 <= self.min_budget <= self.max_budget and 1 <= self.min_seqs <= self.max_seqs):
            raise ValueError(
                "batching targets need 1 <= min_budget <= max_budget and 1 <= min_seqs <= max_seqs"
            )


class BatchingController:
    """Signal: the number of running decodes and their context (snapshot), the step cost model
    (refitted online from the engine's own steps), the queue (waiting prompts and tokens), and the
    window's p90 TPOT.
    Knobs: max_num_batched_tokens, prefill_chunk, max_num_seqs, batch_wait_s.
    Rules:
      - budget = the most tokens whose predicted step time, beside the running decodes and their
        context, stays within safety × TPOT SLO; rounded down to `quantum`, within [min, max].
        With nothing running there is no TPOT to protect: the budget is the ceiling (fastest TTFT).
      - max_num_seqs = the largest decode batch whose predicted step, with one minimum prefill chunk
        beside it, stays within that time (at the window's mean context per sequence).
      - prefill_chunk = half the budget's prefill room while several prompts wait (a short prompt is
        not stuck behind a long one for the long one's whole prefill); 0 (= the budget) otherwise.
      - batch_wait_s = 0 unless the window's p90 TPOT is above the SLO and prompts trickle in: then
        new prompts are held up to a tenth of the TTFT SLO so fewer steps carry prefill.
    Thresholds: `change_ratio` hysteresis on each number; SwitchGuard confirm 2 rounds, cooldown 1 s,
    at most 12 switches a minute per knob group.
    Guardrail: the configured values are ceilings (memory, graphs); a breach of the TPOT SLO in the
    window (p90 above it) shrinks the budget by the measured overshoot before the model catches up."""

    name = "batching"

    def __init__(self, targets: BatchingTargets, cost: StepCostModel | None = None, cost_source=None):
        """`cost_source`: anything with a `.model` StepCostModel refreshed online (OnlineStepCost);
        `cost`: a fixed model (tests, the simulator)."""
        if cost is None and cost_source is None:
            raise ValueError("BatchingController needs a step cost model or an online source of one")
        self.targets = targets
        self._cost, self._cost_source = cost, cost_source
        self._budget_guard = SwitchGuard(cooldown_s=1.0, confirm=2, max_switches=12, window_s=60.0)
        self._seqs_guard = SwitchGuard(cooldown_s=1.0, confirm=2, max_switches=12, window_s=60.0)
        self._wait_guard = SwitchGuard(cooldown_s=2.0, confirm=2, max_switches=6, window_s=60.0)

    @property
    def cost(self) -> StepCostModel:
        return self._cost_source.model if self._cost_source is not None else self._cost

    def decide(self, snapshot: TelemetrySnapshot) -> Decision | None:
        knobs, now = snapshot.knobs, snapshot.time
        changes: dict[str, object] = {}
        reasons: list[str] = []

        budget, why = self.token_budget(snapshot)
        chunk = self.prefill_chunk(snapshot, budget)
        if self._differs(budget, knobs.max_num_batched_tokens) or chunk != knobs.prefill_chunk:
            if self._budget_guard.allow(now, (budget, chunk)):
                self._budget_guard.switched(now)
                changes["max_num_batched_tokens"] = budget
                changes["prefill_chunk"] = chunk
                reasons.append(why)
        else:
            self._budget_guard.reset()

        seqs = self.max_running(snapshot)
        if self._differs(seqs, knobs.max_num_seqs):
            if self._seqs_guard.allow(now, seqs):
                self._seqs_guard.switched(now)
                changes["max_num_seqs"] = seqs
                reasons.append(f"a decode batch of {seqs} fits the step-time target")
        else:
            self._seqs_guard.reset()

        wait = self.batch_wait(snapshot)
        if wait != knobs.batch_wait_s:
            if self._wait_guard.allow(now, wait):
                self._wait_guard.switched(now)
                changes["batch_wait_s"] = wait
                reasons.append(
                    f"p90 TPOT {snapshot.tpot.p90 * 1e3:.0f} ms vs SLO -> batch wait {wait * 1e3:.0f} ms"
                )
        else:
            self._wait_guard.reset()
        return Decision(changes, "; ".join(reasons), self.name) if changes else None

    # ---- the rules, each a pure function of the snapshot -----------------------------------------------

    def step_target_s(self, snapshot: TelemetrySnapshot) -> float:
        """The step time to aim for: safety × TPOT SLO, cut by the overshoot when p90 TPOT broke the SLO."""
        t = self.targets
        target = t.safety * t.tpot_slo_s
        if snapshot.tpot.count >= 4 and snapshot.tpot.p90 > t.tpot_slo_s:
            target *= t.tpot_slo_s / snapshot.tpot.p90
        return target

    def token_budget(self, snapshot: TelemetrySnapshot) -> tuple[int, str]:
        t, cost = self.targets, self.cost
        decodes = snapshot.num_running
        if decodes == 0:
            return t.max_budget, "nothing running: the whole budget goes to prefill"
        context = self._context_per_sequence(snapshot) * decodes
        target = self.step_target_s(snapshot)
        per_token = cost.per_token_s + cost.per_context_s  # a prefill token is computed and attended
        room = target - cost.fixed_s - cost.per_sequence_s * (decodes + 1) - cost.per_context_s * context
        tokens = decodes + max(0.0, room) / max(per_token, 1e-9)
        budget = self._quantize(tokens, t.min_budget, t.max_budget)
        return budget, (
            f"{decodes} decodes at {context / decodes:.0f} context: {budget} tokens fit "
            f"{target * 1e3:.0f} ms (TPOT SLO {t.tpot_slo_s * 1e3:.0f} ms)"
        )

    def prefill_chunk(self, snapshot: TelemetrySnapshot, budget: int) -> int:
        if snapshot.num_waiting <= 1:
            return 0
        room = budget - snapshot.num_running
        return max(self.targets.min_budget, (room // 2) // self.targets.quantum * self.targets.quantum)

    def max_running(self, snapshot: TelemetrySnapshot) -> int:
        t, cost = self.targets, self.cost
        per_seq_context = self._context_per_sequence(snapshot)
        per_seq = cost.per_token_s + cost.per_sequence_s + cost.per_context_s * per_seq_context
        room = self.step_target_s(snapshot) - cost.fixed_s - cost.per_token_s * t.min_budget
        seqs = int(max(0.0, room) / max(per_seq, 1e-9))
        return max(t.min_seqs, min(t.max_seqs, seqs))

    def batch_wait(self, snapshot: TelemetrySnapshot) -> float:
        t = self.targets
        over = snapshot.tpot.count >= 4 and snapshot.tpot.p90 > t.tpot_slo_s
        trickle = snapshot.num_running > 0 and 0 < snapshot.arrival_rate
        return round(t.ttft_slo_s / 10, 3) if over and trickle else 0.0

    def _context_per_sequence(self, snapshot: TelemetrySnapshot) -> float:
        """Mean K/V tokens per running sequence, from the snapshot's extra signal or a 1k default."""
        return snapshot.context_per_sequence if snapshot.context_per_sequence > 0 else 1024.0

    def _differs(self, new: int, old: int) -> bool:
        return abs(new - old) > self.targets.change_ratio * max(old, 1)

    def _quantize(self, tokens: float, low: int, high: int) -> int:
        q = self.targets.quantum
        return int(max(low, min(high, int(tokens) // q * q)))
