"""Window scoring: goodput, miss shares, reward, and both guardrails."""

import pytest

from adaptserve.adapt.knobs import Knobs
from adaptserve.adapt.snapshot import TelemetrySnapshot
from adaptserve.adapt.tuner.reward import SLO, RewardWeights, score_window
from adaptserve.bench.metrics import RequestOutcome

SLO_ = SLO(ttft_s=0.5, tpot_s=0.05)


def outcome(ttft: float = 0.1, tpot: float = 0.02, tokens: int = 11, success: bool = True) -> RequestOutcome:
    return RequestOutcome(success, 8, ttft=ttft, latency=ttft + tpot * (tokens - 1), output_tokens=tokens)


def snapshot(**fields) -> TelemetrySnapshot:
    return TelemetrySnapshot(time=10.0, window_s=10.0, knobs=Knobs(), **fields)


def test_all_good_window_scores_its_goodput():
    score = score_window([outcome()] * 20, 5.0, SLO_)
    assert score.goodput == pytest.approx(4.0)
    assert score.reward == pytest.approx(4.0)
    assert score.attainment == 1.0 and not score.breach


def test_misses_cost_goodput_and_their_weighted_share():
    outcomes = [outcome()] * 6 + [outcome(ttft=2.0)] * 2 + [outcome(tpot=0.2)] + [outcome(success=False)]
    score = score_window(outcomes, 2.0, SLO_, weights=RewardWeights(ttft_miss=2.0, tpot_miss=1.0))
    assert score.num_good == 6 and score.goodput == pytest.approx(3.0)
    assert score.ttft_miss_share == pytest.approx(0.3)  # two late + the failure
    assert score.tpot_miss_share == pytest.approx(0.2)  # one slow + the failure
    assert score.reward == pytest.approx(3.0 - 2.0 * 0.3 - 1.0 * 0.2)
    assert score.slo_breach  # 30 % > 10 %: the p90 is over both SLOs
    assert any("TTFT" in r for r in score.reasons) and any("TPOT" in r for r in score.reasons)


def test_p90_guardrail_tolerates_a_tenth_of_misses():
    assert not score_window([outcome()] * 9 + [outcome(tpot=0.2)], 1.0, SLO_).breach
    assert score_window([outcome()] * 8 + [outcome(tpot=0.2)] * 2, 1.0, SLO_).slo_breach


def test_one_token_requests_have_no_tpot_to_miss():
    assert score_window([outcome(tokens=1, tpot=9.9)], 1.0, SLO_).num_good == 1


def test_memory_and_queue_guardrails_come_from_the_snapshot():
    assert score_window([], 1.0, SLO_, snapshot(kv_usage_max=0.97)).memory_breach
    assert score_window([], 1.0, SLO_, snapshot(preemptions=1)).memory_breach
    queued = score_window([], 1.0, SLO_, snapshot(oldest_waiting_s=0.8))
    assert queued.slo_breach and not queued.memory_breach
    calm = score_window([], 1.0, SLO_, snapshot(kv_usage_max=0.9, oldest_waiting_s=0.2))
    assert not calm.breach and calm.reward == 0.0 and calm.attainment == 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="window"):
        score_window([], 0.0, SLO_)
    with pytest.raises(ValueError, match="SLO"):
        SLO(ttft_s=0.0)
