"""Confidence signals and score: extremes, hand-computed values, dtypes and shapes."""

import math

import pytest
import torch

from adaptserve.adapt.confidence import (
    ConfidenceSignals,
    ConfidenceWeights,
    confidence_score,
    confidence_signals,
)
from adaptserve.config import ConfigError


def test_one_hot_row_scores_near_one():
    logits = torch.full((1, 1000), -30.0)  # [1, V]
    logits[0, 7] = 30.0
    signals = confidence_signals(logits)
    assert signals.max_prob.item() == pytest.approx(1.0)
    assert signals.entropy.item() == pytest.approx(0.0, abs=1e-6)
    assert signals.margin.item() == pytest.approx(60.0)  # clipped to 1 in the score
    assert confidence_score(signals).item() == pytest.approx(1.0, abs=1e-6)


def test_uniform_row_gives_the_minimum():
    vocab_size = 1000
    signals = confidence_signals(torch.zeros(2, vocab_size))
    assert torch.allclose(signals.max_prob, torch.full((2,), 1 / vocab_size))
    assert torch.allclose(signals.entropy, torch.full((2,), math.log(vocab_size)))
    assert torch.equal(signals.margin, torch.zeros(2))
    # ln(1000) = 6.9 nats > entropy_scale 4, so the entropy term clips to 0 and only max_prob is left
    expected = 0.5 * (1 / vocab_size)
    assert torch.allclose(confidence_score(signals), torch.full((2,), expected))


def test_hand_computed_three_token_row():
    # logits [ln 4, ln 2, ln 2] -> softmax = [4, 2, 2] / 8 = [0.5, 0.25, 0.25]
    # max_prob = 0.5
    # entropy  = -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 0.5 ln 2 + 0.5 * 2 ln 2 = 1.5 ln 2 = 1.03972 nats
    # margin   = ln 4 - ln 2 = ln 2 = 0.69315
    # score    = 0.5 * 0.5 + 0.3 * (1 - 1.5 ln 2 / 4) + 0.2 * (ln 2 / 10)
    #          = 0.25 + 0.3 * 0.74007 + 0.2 * 0.069315 = 0.25 + 0.22202 + 0.01386 = 0.48588
    ln2 = math.log(2)
    signals = confidence_signals(torch.tensor([[2 * ln2, ln2, ln2]]))
    assert signals.max_prob.item() == pytest.approx(0.5)
    assert signals.entropy.item() == pytest.approx(1.5 * ln2)
    assert signals.margin.item() == pytest.approx(ln2)
    expected = 0.5 * 0.5 + 0.3 * (1 - 1.5 * ln2 / 4) + 0.2 * (ln2 / 10)
    assert expected == pytest.approx(0.48588, abs=1e-5)
    assert confidence_score(signals).item() == pytest.approx(expected, rel=1e-6)


def test_weights_are_normalised_by_their_sum():
    signals = confidence_signals(torch.tensor([[math.log(3.0), 0.0, 0.0]]))  # probs [0.6, 0.2, 0.2]
    only_prob = confidence_score(signals, ConfidenceWeights(max_prob=2.0, entropy=0.0, margin=0.0))
    assert only_prob.item() == pytest.approx(0.6)
    doubled = ConfidenceWeights(max_prob=1.0, entropy=0.6, margin=0.4)
    assert confidence_score(signals, doubled).item() == pytest.approx(confidence_score(signals).item())


def test_terms_are_clipped_to_unit_range():
    # entropy below 0 and margins above the scale cannot push the score past 1
    signals = ConfidenceSignals(
        max_prob=torch.tensor([1.0, 0.0]),
        entropy=torch.tensor([-1.0, 100.0]),
        margin=torch.tensor([float("inf"), -5.0]),
    )
    assert torch.equal(confidence_score(signals), torch.tensor([1.0, 0.0]))


def test_bfloat16_logits_and_masked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3  # [B, V]
    logits[:, 10:20] = float("-inf")  # masked tokens must not make the entropy NaN
    from_bf16 = confidence_score(confidence_signals(logits.bfloat16()))
    from_fp32 = confidence_score(confidence_signals(logits.bfloat16().float()))
    assert from_bf16.dtype == torch.float32
    assert from_bf16.shape == (4,)
    assert torch.isfinite(from_bf16).all()
    assert torch.allclose(from_bf16, from_fp32)


def test_shapes_are_one_value_per_sequence():
    signals = confidence_signals(torch.randn(5, 11))
    for tensor in (signals.max_prob, signals.entropy, signals.margin, confidence_score(signals)):
        assert tensor.shape == (5,)
    score = confidence_score(signals)
    assert ((score >= 0) & (score <= 1)).all()


@pytest.mark.parametrize("shape", [(10,), (2, 1), (2, 3, 4)])
def test_bad_logit_shapes_are_rejected(shape):
    with pytest.raises(ValueError, match="logits must have shape"):
        confidence_signals(torch.zeros(shape))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_prob": -0.1}, "confidence.max_prob"),
        ({"max_prob": 0.0, "entropy": 0.0, "margin": 0.0}, "must be > 0"),
        ({"entropy_scale": 0.0}, "confidence.entropy_scale"),
        ({"margin_scale": -1.0}, "confidence.margin_scale"),
    ],
)
def test_weight_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ConfidenceWeights(**kwargs)
