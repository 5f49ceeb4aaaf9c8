"""Which weight format each step runs in, and what each step's logits tell the precision policy.

A fixed policy runs every step in one format. The adaptive policy runs each decode-only step in the
precision the controller picked from the previous step's confidence (steps with prompt tokens run
natively, so prompt KV is always full precision). A sample of low-precision steps is shadowed: the
same inputs run again natively and the top-1 tokens are compared, which feeds the quality budget. The
shadow run rewrites those tokens' KV with native values, so shadowing can only help what follows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from adaptserve.adapt.confidence import confidence_score, confidence_signals
from adaptserve.adapt.precision import PrecisionController, PrecisionPolicyConfig
from adaptserve.adapt.quality import QualityMonitor
from adaptserve.config import PrecisionConfig
from adaptserve.model.projection import NATIVE

TOP = "bf16"  # the controller's highest level: the bf16 copy if held, else the native weights


class StepPrecision:
    def __init__(self, config: PrecisionConfig, held_formats: tuple[str, ...]):
        self.adaptive = config.precision_policy == "adaptive"
        self.fixed = NATIVE if config.precision_policy == "native" else config.precision_policy
        self.controller: PrecisionController | None = None
        self.quality: QualityMonitor | None = None
        if self.adaptive:
            available = (TOP, *(f for f in ("fp8", "int4") if f in held_formats))
            self.quality = QualityMonitor(budget=config.quality_budget, shadow_rate=config.shadow_rate)
            self.controller = PrecisionController(PrecisionPolicyConfig(available=available), self.quality)
        self.memory_pressure = 0.0  # set by the engine from KV-cache use before each step
        self.steps_by_precision: Counter[str] = Counter()
        self.last_score: float | None = None

    def choose(self, decode_only: bool) -> str:
        """The format this step runs in."""
        if not self.adaptive:
            precision = self.fixed
        elif not decode_only:
            precision = TOP
        else:
            precision = self.controller.precision
        self.steps_by_precision[precision] += 1
        return precision

    def observe(self, logits: torch.Tensor, precision: str, run: Callable[[str], torch.Tensor]) -> None:
        """After a step: shadow it if sampled, then let the controller pick the next step's precision.
        logits: [N, V] of the sampled rows; run(p) re-runs the step in precision p.

        A low-precision step is shadowed by a native run. While the quality budget holds the top
        level, top-level steps are shadowed by a run in the next lower format instead, so the window
        can recover (no low-precision steps are served meanwhile)."""
        if not self.adaptive or logits.shape[0] == 0:
            return
        lower = self.controller.config.available[1:]
        if precision != TOP and self.quality.should_shadow():
            self._record_agreement(run(TOP), logits)
        elif precision == TOP and lower and not self.quality.within_budget and self.quality.should_shadow():
            self._record_agreement(logits, run(lower[0]))
        score = float(confidence_score(confidence_signals(logits)).min())  # the least confident sequence
        self.last_score = score
        self.controller.decide(score, self.memory_pressure)

    def _record_agreement(self, reference: torch.Tensor, low: torch.Tensor) -> None:
        agree = int((reference.argmax(-1) == low.argmax(-1)).sum())  # top-1 tokens that match
        self.quality.record(agree, reference.shape[0])

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
