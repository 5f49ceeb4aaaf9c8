"""The speculation policy's estimators: the step-cost line, acceptance by position, buckets."""

import pytest

from adaptserve.adapt.spec_estimates import (
    Acceptance,
    ArmValue,
    OnlineLinearCost,
    bucket_of,
    draft_cut,
    draft_lengths,
    expected_tokens,
    neighbourhood,
    tokens_per_sequence,
)


def test_linear_cost_recovers_the_line_and_follows_change():
    cost = OnlineLinearCost(forget=0.9)
    for tokens in range(1, 60):
        cost.add(tokens, 0.004 + 0.0002 * tokens)
    assert cost.coefficients() == pytest.approx((0.004, 0.0002), rel=1e-6)
    for tokens in range(1, 200):
        cost.add(tokens % 60 + 1, 0.008 + 0.0002 * (tokens % 60 + 1))
    assert cost.coefficients()[0] == pytest.approx(0.008, rel=0.01)


def test_expected_tokens_acceptance_and_draft_lengths():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens([0.5, 1.0], 2) == pytest.approx(2.0)
    acceptance = Acceptance(prior=0.5, prior_trials=2, forget=1.0)
    for _ in range(50):
        acceptance.add(4, 4)
    assert acceptance.rate > 0.98
    assert draft_lengths(8) == (1, 2, 4, 8) and draft_lengths(6) == (1, 2, 4, 6) and draft_lengths(1) == (1,)


def test_acceptance_is_measured_per_position():
    """Copy-like drafts: the first is accepted half the time, and once it is, the rest follow: 5
    tokens per step at k=8. The pooled rate (8 accepted of 9 tested, 0.89) predicts 5.9 as if
    drafts were accepted independently; per position the estimate is about 5."""
    acceptance = Acceptance(forget=1.0)
    for step in range(200):
        acceptance.add(8, 8 if step % 2 else 0)
    assert acceptance.rate_at(0) == pytest.approx(0.5, abs=0.01)
    assert all(rate > 0.97 for rate in acceptance.rates(8)[1:])
    assert expected_tokens(acceptance.rates(8), 8) == pytest.approx(1 + 0.5 * 8, abs=0.3)
    assert expected_tokens(acceptance.rate, 8) > 5.7  # independent draws at the pooled rate


def test_a_request_leans_on_its_drafters_current_rates():
    drafter = Acceptance(forget=1.0)
    request = Acceptance(parent=drafter)
    assert request.rate_at(3) == pytest.approx(0.5)  # the drafter knows nothing yet either
    for _ in range(100):
        drafter.add(4, 4)
    assert request.rate_at(3) > 0.95  # the prior follows the drafter, not its value at creation


def test_positions_a_shorter_k_leaves_untested_drift_to_the_one_before():
    """k=8 ran, then only k=4: positions 5-8 forget their trials and lean on position 4's rate, not
    on the fixed prior (that made k=8 look 30 % worse than k=4 on the H100 and kept it off)."""
    acceptance = Acceptance(forget=0.99)
    for step in range(50):
        acceptance.add(8, 8 if step % 5 else 0)
    for step in range(1000):
        acceptance.add(4, 4 if step % 5 else 0)
    rates = acceptance.rates(8)
    assert rates[3] > 0.95
    assert all(rate == pytest.approx(rates[3], abs=0.02) for rate in rates[4:])
    assert Acceptance(prior=0.3).rates(3) == pytest.approx([0.3, 0.3, 0.3])  # nothing measured


def test_an_arms_value_is_the_median_of_its_recent_steps():
    value = ArmValue()
    assert value.seconds_per_sequence == 0.0
    for seconds in (0.3, 0.002, 0.0021, 0.0019):  # a graph capture, then plain steps
        value.add(seconds)
    assert value.seconds_per_sequence == pytest.approx(0.00205)
    for _ in range(ArmValue.WINDOW):
        value.add(0.004)  # the machine got slower: the window follows
    assert value.seconds_per_sequence == 0.004 and value.samples == 4 + ArmValue.WINDOW


def test_buckets_are_quarter_octaves_and_neighbours_skip_empty_numbers():
    assert [bucket_of(n) for n in (1, 2, 3, 4, 5, 8)] == [0, 4, 6, 8, 9, 12]
    assert bucket_of(30) == bucket_of(34) != bucket_of(35)
    assert neighbourhood(bucket_of(3)) == (6, 4, 8)  # batch 3, then 2, then 4
    assert neighbourhood(bucket_of(1)) == (0, 4)
    assert neighbourhood(bucket_of(128)) == (28, 27, 29)


def test_the_draft_cut_keeps_drafts_whose_chance_beats_the_threshold():
    even = Acceptance(prior=0.5, prior_trials=1e9)  # 0.5 at every position
    assert draft_cut(even, 8, 0.1) == 3  # 0.5^3 = 0.125 >= 0.1 > 0.5^4
    assert draft_cut(even, 8, 0.0) == 8
    assert draft_cut(even, 8, 0.9) == 1  # never fewer than one
    assert tokens_per_sequence(even, 0.5, 8, 0.1) == pytest.approx(0.5 * expected_tokens(0.5, 3) + 0.5)
