"""The speculation policy's step cost: the line, the drafters' overhead, the outlier filter."""

import pytest

from adaptserve.adapt.spec_step_cost import SpecStepCost, overhead_units


def test_a_one_off_step_is_skipped_and_a_run_of_them_believed():
    cost = SpecStepCost(("ngram",))
    for tokens in range(1, 20):
        assert cost.observe("", 0, tokens, tokens, 0.001 + 0.0001 * tokens)
    assert not cost.observe("", 0, 4, 4, 0.3)  # a graph capture: 200x the line
    assert cost.line.predict(4) == pytest.approx(0.0014, rel=1e-6) and cost.num_outliers == 1
    assert not cost.observe("", 0, 4, 4, 0.3) and not cost.observe("", 0, 4, 4, 0.3)
    assert cost.observe("", 0, 4, 4, 0.3)  # the fourth in a row: the machine changed
    assert cost.line.predict(4) > 0.0014


def test_lookup_overhead_counts_per_sequence_layer_drafts_per_token():
    assert overhead_units("ngram", 4, 64) == 64
    assert overhead_units("layers15", 4, 64) == 4 and overhead_units("draft", 2, 64) == 2
    cost = SpecStepCost(("ngram",))
    for tokens in range(1, 20):
        cost.observe("", 0, tokens, tokens, 0.001 + 0.0001 * tokens)
    cost.draft_overhead["ngram"] = 1e-4
    assert cost.predict("ngram", 1, 8, 16) == pytest.approx(0.001 + 0.0016 + 8 * 1e-4)
    assert cost.predict("", 0, 8, 8) == pytest.approx(0.0018)
