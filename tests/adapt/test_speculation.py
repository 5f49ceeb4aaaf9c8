"""The speculation policy driven with synthetic step costs and acceptance."""

import pytest

from adaptserve.adapt.speculation import Acceptance, OnlineLinearCost, SpeculationPolicy, expected_tokens


def feed(policy, *, intercept, slope, spec_intercept=None, alpha=0.8, batch=1, steps=40, k=4):
    """Steps of both kinds at costs seconds = intercept + slope * tokens, drafts accepted at alpha."""
    spec_intercept = intercept if spec_intercept is None else spec_intercept
    for i in range(steps):
        policy.observe_step(batch + i % 3, 0, intercept + slope * (batch + i % 3))
        tokens = batch * (1 + k) + i % 5
        policy.observe_step(tokens, batch * k, spec_intercept + slope * tokens)
        accepted = int(alpha * k + 0.5) if i % 2 else int(alpha * k)
        policy.observe_request("r", k, min(k, accepted))


def test_linear_cost_recovers_the_line_and_follows_change():
    cost = OnlineLinearCost(forget=0.9)
    for tokens in range(1, 60):
        cost.add(tokens, 0.004 + 0.0002 * tokens)
    assert cost.coefficients() == pytest.approx((0.004, 0.0002), rel=1e-6)
    for tokens in range(1, 200):
        cost.add(tokens % 60 + 1, 0.008 + 0.0002 * (tokens % 60 + 1))
    assert cost.coefficients()[0] == pytest.approx(0.008, rel=0.01)


def test_expected_tokens_and_acceptance():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    acceptance = Acceptance(prior=0.5, prior_trials=2, forget=1.0)
    for _ in range(50):
        acceptance.add(4, 4)  # all accepted: 4 trials, 4 successes
    assert acceptance.rate > 0.98


def test_memory_bound_batch_one_speculates_with_long_drafts():
    policy = SpeculationPolicy(max_draft=4, probe_interval_s=1e9)
    feed(policy, intercept=0.010, slope=0.00005)
    assert policy.predicted_gain(1) > 2
    assert policy.draft_budget(0.0, 1) == 4
    assert policy.request_draft_len("r", 4, 1) == 4


def test_compute_bound_large_batch_turns_speculation_off():
    policy = SpeculationPolicy(max_draft=4, probe_interval_s=1e9)
    feed(policy, intercept=0.002, slope=0.001, batch=64)
    assert policy.predicted_gain(64) < 0.95
    budgets = [policy.draft_budget(t * 0.5, 64) for t in range(12)]
    assert budgets[-1] == 0 and not policy.enabled
    assert "batch 64" in policy.last_reason


def test_costly_verify_steps_turn_it_off_even_at_batch_one():
    """On a GPU a verify step loses the CUDA graph: a large intercept can outweigh the drafts."""
    policy = SpeculationPolicy(max_draft=4, probe_interval_s=1e9)
    feed(policy, intercept=0.006, spec_intercept=0.030, slope=0.00001, alpha=0.3)
    assert policy.predicted_gain(1) < 0.95
    for t in range(12):
        policy.draft_budget(t * 0.5, 1)
    assert not policy.enabled


def test_a_gain_oscillating_inside_the_band_never_flips_the_switch():
    policy = SpeculationPolicy(max_draft=4, probe_interval_s=1e9)
    gains = iter([1.04, 0.96, 1.03, 0.97] * 20)
    policy.predicted_gain = lambda batch: next(gains)
    switches = 0
    for t in range(80):
        before = policy.enabled
        policy.draft_budget(t * 0.5, 8)
        switches += policy.enabled != before
    assert switches == 0 and policy.enabled


def test_a_gain_alternating_across_the_band_switches_at_most_by_the_guard():
    policy = SpeculationPolicy(max_draft=4, probe_interval_s=1e9)
    gains = iter([1.5, 1.5, 0.5, 0.5] * 100)
    policy.predicted_gain = lambda batch: next(gains)
    switches = 0
    for t in range(400):
        before = policy.enabled
        policy.draft_budget(t * 0.01, 8)  # 4 s of steps, 10 ms apart
        switches += policy.enabled != before
    assert switches == 0  # never 3 confirmations in a row


def test_probes_keep_the_other_step_kind_measured():
    policy = SpeculationPolicy(max_draft=4, probe_interval_s=1.0)
    feed(policy, intercept=0.002, slope=0.001, batch=64)
    for t in range(30):
        policy.draft_budget(t * 0.5, 64)
    assert not policy.enabled
    budgets = [policy.draft_budget(15 + t * 0.1, 64) for t in range(40)]  # 4 s at 100 ms per step
    assert 3 <= sum(b > 0 for b in budgets) <= 5  # one probe step per second


def test_fixed_policy_always_drafts_the_maximum():
    policy = SpeculationPolicy(max_draft=3, adaptive=False)
    feed(policy, intercept=0.002, slope=0.001, batch=64)
    assert policy.draft_budget(0.0, 64) == 3 and policy.request_draft_len("r", 3, 64) == 3
