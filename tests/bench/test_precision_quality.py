"""The precision quality benchmark: its comparisons by hand, and a tiny slice of it on the real SmolLM2."""

import math

import pytest

from adaptserve.bench.precision_cli import markdown_table
from adaptserve.bench.precision_quality import QualitySpec, compare_free_running, measure_precision_quality

SLICE = QualitySpec(
    num_prompts=2, max_tokens=8, num_text_tokens=256, window=128, formats=("bf16", "int4"), device="cpu"
)


def test_free_running_comparison_stops_at_the_first_divergence():
    reference = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    replies = [[1, 2, 9, 4], [5, 6], [0, 8, 9]]
    result = compare_free_running(reference, replies)
    # prompt 0: 2 match, then the divergence (3 compared); prompt 1: 2 of 2; prompt 2: 0 of 1
    assert result["agreement_to_divergence"] == pytest.approx(4 / 6)
    assert result["tokens_compared"] == 6
    assert result["positional_match"] == pytest.approx(7 / 9)  # later positions count here
    assert result["identical"] == pytest.approx(1 / 3)
    assert result["mean_first_divergence"] == pytest.approx(1.0)  # at positions 2 and 0


@pytest.fixture(scope="module")
def measured(smollm2):
    return measure_precision_quality(smollm2, SLICE)


def test_native_row_is_the_reference(measured):
    native = measured["formats"]["native"]
    # the scoring pass (prompt + reply at once) predicts what the engine's decode steps generated
    assert native["teacher_forced"] == {
        "agreement": 1.0,
        "tokens": measured["settings"]["num_reference_tokens"],
    }
    assert native["free_running"]["identical"] == 1.0
    assert native["text_tokens_predicted"] == 2 * 127  # two windows of 128 tokens
    assert native["perplexity"] == pytest.approx(math.exp(native["mean_nll"]))
    assert 5 < native["perplexity"] < 100  # Python documentation under a 135M chat model


def test_formats_lose_quality_in_order(measured):
    rows = measured["formats"]
    native, bf16, int4 = rows["native"], rows["bf16"], rows["int4"]
    assert bf16["perplexity"] == pytest.approx(native["perplexity"], rel=0.01)
    assert int4["perplexity"] > native["perplexity"] * 1.05  # group 128 over Q4_1 weights of group 32
    for row in rows.values():
        assert 0 <= row["teacher_forced"]["agreement"] <= 1
        assert 0 <= row["free_running"]["positional_match"] <= 1
    assert int4["teacher_forced"]["agreement"] < 1


def test_adaptive_policy_reports_its_steps(measured):
    adaptive = measured["adaptive"]
    num_tokens = measured["settings"]["num_reference_tokens"]
    assert adaptive["levels"] == ["native", "fp8", "int4"]  # no bf16 copy: the top level is native
    free, forced = adaptive["free_running"], adaptive["teacher_forced"]
    assert sum(free["tokens_by_precision"].values()) == free["tokens_compared"] == num_tokens
    assert sum(forced["tokens_by_precision"].values()) == forced["tokens"] == num_tokens
    # each reply's first token comes from its prompt step, which is not a decode step
    assert sum(forced["decode_steps_by_precision"].values()) == num_tokens - SLICE.num_prompts
    top = forced["agreement_by_precision"]["native"]
    assert top["agreement"] == 1.0  # driving the runner step by step at the top level is the reference
    table = markdown_table(measured)
    assert table.count("\n| ") == 4 and "adaptive (per step, batch 1)" in table
