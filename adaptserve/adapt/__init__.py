"""The adaptive controllers: each owns one knob, reads telemetry, and returns a decision or None."""

from adaptserve.adapt.precision import (
    PRECISIONS,
    PrecisionController,
    PrecisionDecision,
    PrecisionPolicyConfig,
)
from adaptserve.adapt.quality import QualityMonitor

__all__ = [
    "PRECISIONS",
    "ConfidenceSignals",
    "ConfidenceWeights",
    "PrecisionController",
    "PrecisionDecision",
    "PrecisionPolicyConfig",
    "QualityMonitor",
    "confidence_score",
    "confidence_signals",
]

_CONFIDENCE_NAMES = {"ConfidenceSignals", "ConfidenceWeights", "confidence_score", "confidence_signals"}


def __getattr__(name: str):
    # confidence.py needs torch; importing it lazily keeps the controllers importable without it (sim, tests)
    if name in _CONFIDENCE_NAMES:
        from adaptserve.adapt import confidence

        return getattr(confidence, name)
    raise AttributeError(f"module 'adaptserve.adapt' has no attribute {name!r}")
