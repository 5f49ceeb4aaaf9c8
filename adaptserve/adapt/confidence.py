"""Per-sequence confidence of one decode step, from its logits.

Three signals say how sure the model is of its next token: the probability of the most likely token,
the entropy of the distribution, and the logit margin between the two best tokens. `confidence_score`
folds them into one number in [0, 1] that the precision controller reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptserve.config import ConfigError

__all__ = ["ConfidenceSignals", "ConfidenceWeights", "confidence_score", "confidence_signals"]


@dataclass(frozen=True, slots=True)
class ConfidenceSignals:
    """One value per sequence, float32."""

    max_prob: torch.Tensor  # [B] probability of the most likely token
    entropy: torch.Tensor  # [B] entropy of the next-token distribution, nats
    margin: torch.Tensor  # [B] top-1 logit minus top-2 logit


def confidence_signals(logits: torch.Tensor) -> ConfidenceSignals:
    """Signals of `logits` [B, V] (any float dtype, V >= 2), computed in float32 on the logits' device.

    Masked tokens (logit -inf) are fine: they have probability 0 and add nothing to the entropy.
    """
    if logits.dim() != 2 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have shape [B, V] with V >= 2, got {tuple(logits.shape)}")
    logits = logits.float()  # [B, V]
    probs = torch.softmax(logits, dim=-1)  # [B, V]
    entropy = torch.special.entr(probs).sum(dim=-1)  # [B]; entr(0) = 0, so -inf logits are safe
    top2 = logits.topk(2, dim=-1).values  # [B, 2]
    return ConfidenceSignals(
        max_prob=probs.max(dim=-1).values,  # [B]
        entropy=entropy,
        margin=top2[:, 0] - top2[:, 1],  # [B]
    )


@dataclass(frozen=True)
class ConfidenceWeights:
    """How the three signals are weighted and scaled into one score; weights are normalised by their sum."""

    max_prob: float = 0.5  # weight of the top-1 probability
    entropy: float = 0.3  # weight of 1 - entropy / entropy_scale
    margin: float = 0.2  # weight of margin / margin_scale
    entropy_scale: float = 4.0  # entropy (nats) at which the entropy term reaches 0
    margin_scale: float = 10.0  # logit margin at which the margin term reaches 1

    def __post_init__(self) -> None:
        for name in ("max_prob", "entropy", "margin"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"confidence.{name}={getattr(self, name)} must be >= 0")
        if not self.max_prob + self.entropy + self.margin > 0:
            raise ConfigError("confidence weights max_prob + entropy + margin must be > 0")
        for name in ("entropy_scale", "margin_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"confidence.{name}={getattr(self, name)} must be > 0")


def confidence_score(signals: ConfidenceSignals, weights: ConfidenceWeights | None = None) -> torch.Tensor:
    """Confidence in [0, 1] per sequence, [B] float32.

    score = (w_p * p + w_e * (1 - H / entropy_scale) + w_m * margin / margin_scale) / (w_p + w_e + w_m)

    Each normalised term is clipped to [0, 1] before weighting, so one extreme signal cannot push the
    score out of range or outvote the others: an entropy above `entropy_scale` counts as 0 (a uniform
    row over more than e^4 ~ 55 tokens scores just w_p / V), a margin above `margin_scale` counts as 1
    (and an infinite margin, when only one token is unmasked, is 1 too).
    """
    weights = weights or ConfidenceWeights()
    prob_term = signals.max_prob.clamp(0.0, 1.0)  # [B]
    entropy_term = (1.0 - signals.entropy / weights.entropy_scale).clamp(0.0, 1.0)  # [B]
    margin_term = (signals.margin / weights.margin_scale).clamp(0.0, 1.0)  # [B]
    total = weights.max_prob + weights.entropy + weights.margin
    score = weights.max_prob * prob_term + weights.entropy * entropy_term + weights.margin * margin_term
    return score / total  # [B]
