"""Which weight format each step runs in, and what each step's logits tell the precision policy.

A fixed policy runs every step in one format. The adaptive policy runs each decode-only step in the
precision the controller picked from the previous step's confidence (steps with prompt tokens run at
the top level, so prompt KV is always full precision). A sample of steps is shadowed to measure the
quality budget: a low-precision step against a top-level run, and, while the budget holds the top
level, a top-level step against the next lower format so the measurement can recover. The shadow
runs before the served run, so the KV cache ends up holding the served precision's values either way.
"""

from __future__ import annotations

from collections import Counter

import torch

from adaptserve.adapt.confidence import ConfidenceSignals, confidence_score, confidence_signals
from adaptserve.adapt.precision import PRECISIONS, PrecisionController, PrecisionPolicyConfig
from adaptserve.adapt.quality import QualityMonitor
from adaptserve.config import PrecisionConfig
from adaptserve.model.projection import NATIVE

TOP = PRECISIONS[0]  # the controller's highest level: the bf16 copy if held, else the native weights


class StepPrecision:
    def __init__(self, config: PrecisionConfig, held_formats: tuple[str, ...]):
        self.adaptive = config.precision_policy == "adaptive"
        self.fixed = NATIVE if config.precision_policy == "native" else config.precision_policy
        self.controller: PrecisionController | None = None
        self.quality: QualityMonitor | None = None
        if self.adaptive:
            available = tuple(p for p in PRECISIONS if p == TOP or p in held_formats)
            self.quality = QualityMonitor(budget=config.quality_budget, shadow_rate=config.shadow_rate)
            self.controller = PrecisionController(PrecisionPolicyConfig(available=available), self.quality)
        self.memory_pressure = 0.0  # set by the engine from KV-cache use before each step
        self.steps_by_precision: Counter[str] = Counter()
        # adaptive only, for reports and examples: the last observed step and the shadow counts since start
        self.last_precision: str | None = None  # the format the last sampled step was served in
        self.last_signals: ConfidenceSignals | None = None  # that step's signals, one per sampled row
        self.last_score: float | None = None
        self.num_shadowed_tokens = 0  # sampled rows compared with the other precision
        self.num_shadow_agreements = 0  # of those, rows whose top-1 tokens matched

    def peek(self) -> str:
        """The format the next decode step would be served in (nothing counted or sampled)."""
        return self.controller.precision if self.adaptive else self.fixed

    def choose(self, decode_only: bool) -> tuple[str, str | None]:
        """(the format this step is served in, the format to shadow it with or None)."""
        if not self.adaptive:
            self.steps_by_precision[self.fixed] += 1
            return self.fixed, None
        precision = self.controller.precision if decode_only else TOP
        self.steps_by_precision[precision] += 1
        lower = self.controller.config.available[1:]
        if precision != TOP:
            shadow = TOP
        elif decode_only and lower and not self.quality.within_budget:
            shadow = lower[0]
        else:
            return precision, None
        return precision, shadow if self.quality.should_shadow() else None

    def observe(self, logits: torch.Tensor, precision: str, shadow_logits: torch.Tensor | None) -> None:
        """After a step: record the shadow comparison, then let the controller pick the next step's
        precision from the least confident sequence. logits, shadow_logits: [N, V] of the sampled rows."""
        if not self.adaptive or logits.shape[0] == 0:
            return
        if shadow_logits is not None:
            reference, low = (logits, shadow_logits) if precision == TOP else (shadow_logits, logits)
            agree = int((reference.argmax(-1) == low.argmax(-1)).sum())  # top-1 tokens that match
            self.quality.record(agree, logits.shape[0])
            self.num_shadowed_tokens += logits.shape[0]
            self.num_shadow_agreements += agree
        self.last_precision = precision
        self.last_signals = confidence_signals(logits)
        self.last_score = float(confidence_score(self.last_signals).min())
        self.controller.decide(self.last_score, self.memory_pressure)

    def summary(self) -> dict[str, float | int | str]:
        """Plain numbers for stats and metrics."""
        out: dict[str, float | int | str] = {f"steps_{k}": v for k, v in self.steps_by_precision.items()}
        if self.adaptive:
            out.update(
                precision=self.controller.precision,
                switches=self.controller.num_switches,
                agreement=self.quality.agreement,
            )
        return out
