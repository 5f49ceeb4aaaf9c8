"""How the tuner scores one decision window: a reward to maximise and a guardrail not to break.

    reward = goodput - ttft_weight * share of TTFT misses - tpot_weight * share of TPOT misses

Goodput is requests per second that met every SLO (TTFT and TPOT), counted as `bench.metrics` counts
it; a failed request misses both. The penalty terms push the tuner off settings that finish many requests
but leave a tail out of the SLO; their weights are in requests per second (the reward a window loses
when every one of its requests misses that SLO), 1 req/s each by default.

The guardrail is what the safe tuner must not break while exploring:
- SLO guardrail: the window's p90 TTFT or p90 TPOT above its SLO, i.e. more than 10 % of the finished
  requests missed it; also a request still queued longer than the TTFT SLO (it has missed already,
  the finished ones just do not show it yet);
- memory guardrail: KV use above 95 % at any step of the window, or any preemption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from adaptserve.adapt.snapshot import TelemetrySnapshot
from adaptserve.bench.metrics import RequestOutcome, tpot


@dataclass(frozen=True, slots=True)
class SLO:
    """Per-request latency objectives, seconds."""

    ttft_s: float = 1.0  # time to first token
    tpot_s: float = 0.1  # time per output token after the first

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLOs must be > 0 seconds, got ttft_s={self.ttft_s}, tpot_s={self.tpot_s}")


@dataclass(frozen=True, slots=True)
class RewardWeights:
    ttft_miss: float = 1.0  # req/s of reward lost when every request of the window misses TTFT
    tpot_miss: float = 1.0  # req/s of reward lost when every request of the window misses TPOT


@dataclass(frozen=True, slots=True)
class Guardrail:
    percentile: float = 90.0  # the latency percentile held to the SLO
    max_kv_usage: float = 0.95  # memory guardrail: KV use above this at any step of the window ...
    max_preemptions: int = 0  # ... or more preemptions than this in the window
    max_queue_wait: float = 1.0  # a request still queued longer than this many TTFT SLOs breaks it too

    def __post_init__(self) -> None:
        if not 0 < self.percentile < 100:
            raise ValueError(f"guardrail percentile must be in (0, 100), got {self.percentile}")


@dataclass(frozen=True, slots=True)
class WindowScore:
    """One decision window, scored."""

    duration_s: float
    num_finished: int  # requests that ended in the window (failed ones included)
    num_good: int  # of those, successful and within every SLO
    goodput: float  # num_good per second
    ttft_miss_share: float  # share of finished requests over the TTFT SLO (or failed)
    tpot_miss_share: float  # share of finished requests over the TPOT SLO (or failed)
    reward: float
    slo_breach: bool
    memory_breach: bool
    reasons: tuple[str, ...] = ()  # why the guardrail broke, one line each

    @property
    def breach(self) -> bool:
        return self.slo_breach or self.memory_breach

    @property
    def attainment(self) -> float:
        """Share of finished requests within every SLO; 1.0 for a window where none finished."""
        return self.num_good / self.num_finished if self.num_finished else 1.0


def score_window(
    outcomes: Sequence[RequestOutcome],
    duration_s: float,
    slo: SLO,
    snapshot: TelemetrySnapshot | None = None,
    weights: RewardWeights = RewardWeights(),
    guardrail: Guardrail = Guardrail(),
) -> WindowScore:
    """Reward and guardrail of a window from the requests that finished in it; `snapshot` (taken at
    the window's end) adds the queue and memory signals."""
    if not duration_s > 0:
        raise ValueError(f"a decision window must last > 0 s, got {duration_s}")
    ttft_misses = tpot_misses = num_good = 0
    for outcome in outcomes:
        missed_ttft = not outcome.success or outcome.ttft > slo.ttft_s
        missed_tpot = not outcome.success or (tpot(outcome) or 0.0) > slo.tpot_s
        ttft_misses += missed_ttft
        tpot_misses += missed_tpot
        num_good += not (missed_ttft or missed_tpot)
    num = len(outcomes)
    ttft_share = ttft_misses / num if num else 0.0
    tpot_share = tpot_misses / num if num else 0.0
    goodput = num_good / duration_s
    reward = goodput - weights.ttft_miss * ttft_share - weights.tpot_miss * tpot_share
    reasons = _slo_reasons(ttft_share, tpot_share, slo, snapshot, guardrail)
    memory = _memory_reasons(snapshot, guardrail)
    return WindowScore(
        duration_s,
        num,
        num_good,
        goodput,
        ttft_share,
        tpot_share,
        reward,
        slo_breach=bool(reasons),
        memory_breach=bool(memory),
        reasons=tuple(reasons + memory),
    )


def _slo_reasons(
    ttft_share: float, tpot_share: float, slo: SLO, snapshot: TelemetrySnapshot | None, guardrail: Guardrail
) -> list[str]:
    # the p-th percentile is above the SLO exactly when more than (100 - p) % of the samples are
    allowed = (100.0 - guardrail.percentile) / 100.0
    p = f"p{guardrail.percentile:g}"
    reasons = []
    if ttft_share > allowed:
        reasons.append(f"{p} TTFT > {slo.ttft_s * 1000:g} ms ({ttft_share:.0%} missed)")
    if tpot_share > allowed:
        reasons.append(f"{p} TPOT > {slo.tpot_s * 1000:g} ms ({tpot_share:.0%} missed)")
    if snapshot is not None and snapshot.oldest_waiting_s > guardrail.max_queue_wait * slo.ttft_s:
        reasons.append(f"a request has waited {snapshot.oldest_waiting_s:.2f} s > TTFT SLO in the queue")
    return reasons


def _memory_reasons(snapshot: TelemetrySnapshot | None, guardrail: Guardrail) -> list[str]:
    if snapshot is None:
        return []
    reasons = []
    if snapshot.kv_usage_max > guardrail.max_kv_usage:
        reasons.append(f"KV use {snapshot.kv_usage_max:.0%} > {guardrail.max_kv_usage:.0%}")
    if snapshot.preemptions > guardrail.max_preemptions:
        reasons.append(f"{snapshot.preemptions} preemptions")
    return reasons
