"""The adaptive batching controller driven by synthetic snapshots: budgets that fit the TPOT SLO,
slack that grows them, a breach that shrinks them, and no thrash on a signal around a threshold."""

import math

import pytest

from adaptserve.adapt.batching import BatchingController, BatchingTargets
from adaptserve.adapt.knobs import Knobs
from adaptserve.adapt.step_cost import StepCostModel

from .snapshots import latency, snapshot

COST = StepCostModel(fixed_s=0.006, per_token_s=2.5e-5, per_sequence_s=1e-5, per_context_s=5e-8)
TARGETS = BatchingTargets(tpot_slo_s=0.05, ttft_slo_s=1.0, max_budget=4096, max_seqs=256)


def controller():
    return BatchingController(TARGETS, COST)


def test_the_budget_is_the_most_tokens_whose_step_fits_the_tpot_target():
    c = controller()
    snap = snapshot(num_running=32, context_per_sequence=1000.0)
    budget, _ = c.token_budget(snap)
    predicted = COST.predict(budget, 33, 32 * 1000 + budget)
    assert predicted <= 0.8 * 0.05 < COST.predict(budget + 64, 33, 32 * 1000 + budget + 64)
    assert budget % 64 == 0


def test_more_running_context_leaves_less_room_for_prefill():
    c = controller()
    small, _ = c.token_budget(snapshot(num_running=8, context_per_sequence=200.0))
    large, _ = c.token_budget(snapshot(num_running=128, context_per_sequence=4000.0))
    assert large < small
    assert c.token_budget(snapshot(num_running=0))[0] == 4096  # nothing to protect: the ceiling


def test_a_tpot_breach_shrinks_the_budget_below_what_the_model_predicts():
    c = controller()
    calm = snapshot(num_running=32, context_per_sequence=1000.0, tpot=latency(0.03))
    breach = snapshot(num_running=32, context_per_sequence=1000.0, tpot=latency(0.1))
    assert c.token_budget(breach)[0] < c.token_budget(calm)[0]


def test_max_running_keeps_a_decode_step_inside_the_target():
    c = controller()
    seqs = c.max_running(snapshot(context_per_sequence=2000.0))
    step = COST.predict(seqs + 64, seqs + 1, seqs * 2000)
    assert step <= 0.8 * 0.05 * 1.05
    assert TARGETS.min_seqs <= seqs <= TARGETS.max_seqs
    assert c.max_running(snapshot(context_per_sequence=100.0)) > seqs


def test_decisions_need_two_rounds_and_then_respect_the_cooldown():
    c = controller()
    knobs = Knobs(max_num_seqs=256, max_num_batched_tokens=4096)
    snap = snapshot(time=0.0, knobs=knobs, num_running=64, context_per_sequence=1000.0)
    assert c.decide(snap) is None  # first proposal: confirm=2
    decision = c.decide(snapshot(time=0.25, knobs=knobs, num_running=64, context_per_sequence=1000.0))
    assert decision is not None and decision.controller == "batching"
    assert decision.changes["max_num_batched_tokens"] < 4096
    assert "TPOT SLO 50 ms" in decision.reason


def test_a_signal_oscillating_around_a_threshold_does_not_make_the_knob_oscillate():
    """Running sequences wobble by ±4 around 48 every round, so the budget they imply crosses a
    quantum boundary back and forth; it moves by less than the hysteresis ratio, so after settling
    the knob stays put."""
    c = controller()
    knobs = Knobs(max_num_seqs=256, max_num_batched_tokens=4096)
    num_switches = 0
    for i in range(400):
        running = 48 + round(4 * math.sin(i))
        snap = snapshot(time=0.25 * i, knobs=knobs, num_running=running, context_per_sequence=5000.0)
        decision = c.decide(snap)
        if decision is not None:
            num_switches += 1
            for name, value in decision.changes.items():
                setattr(knobs, name, value)
    assert num_switches <= 2


def test_a_load_flipping_between_two_levels_every_round_is_held_by_confirmation():
    c = controller()
    knobs = Knobs(max_num_seqs=256, max_num_batched_tokens=4096)
    decisions = [
        c.decide(
            snapshot(
                time=0.25 * i, knobs=knobs, num_running=(8 if i % 2 else 200), context_per_sequence=2000.0
            )
        )
        for i in range(200)
    ]
    assert all(d is None or "max_num_batched_tokens" not in d.changes for d in decisions)


def test_batch_wait_only_under_tpot_pressure_with_prompts_arriving():
    c = controller()
    assert c.batch_wait(snapshot(num_running=10, arrival_rate=5.0, tpot=latency(0.03))) == 0.0
    assert c.batch_wait(snapshot(num_running=10, arrival_rate=5.0, tpot=latency(0.08))) == pytest.approx(0.1)
    assert c.batch_wait(snapshot(num_running=0, arrival_rate=5.0, tpot=latency(0.08))) == 0.0


def test_prefill_chunk_splits_the_room_only_when_several_prompts_wait():
    c = controller()
    assert c.prefill_chunk(snapshot(num_waiting=1, num_running=10), 1024) == 0
    assert c.prefill_chunk(snapshot(num_waiting=5, num_running=10), 1024) == 448


def test_targets_are_checked():
    with pytest.raises(ValueError, match="safety"):
        BatchingTargets(safety=1.5)
    with pytest.raises(ValueError, match="cost model"):
        BatchingController(TARGETS)
