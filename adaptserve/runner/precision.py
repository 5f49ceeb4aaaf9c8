"""Which weight format each step runs in, and what each step's logits tell the precision policy.

A fixed policy runs every step in one format. The adaptive policy runs each decode-only step in the
precision the controller picked from the previous step's confidence (steps with prompt tokens run at
the top level, so prompt KV is always full precision). A sample of steps is shadowed to measure the
quality budget: a low-precision step against a top-level run, and, while the budget holds the top
level, a top-level step against the next lower format so the measurement can recover. The shadow
runs before the served run, so the KV cache ends up holding the served precision's values either way.

No waiting on the device: a step's score (the least confident row's) and its shadow agreement are
reduced on the device and copied to pinned host memory without blocking; the controller reads each
step's numbers once its copy has landed, in step order. On a GPU the next step is launched while
this one runs, so "the previous step" the controller decides from is, in steady state, the one
before it (a lag of one step; patience is 4 steps anyway). Reading the score at once cost a
device-host round trip per step, which left the host's work for the next step unhidden: 6.78 ms a
step at batch 1 on the H100 against 5.93 ms for fixed bf16, with every step in bf16
(precision-decode-adaptive-h100.json, 2026-12-07). On the CPU every copy has landed at once.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import torch

from adaptserve.adapt.confidence import ConfidenceSignals, confidence_score, confidence_signals
from adaptserve.adapt.precision import PRECISIONS, PrecisionController, PrecisionPolicyConfig
from adaptserve.adapt.quality import QualityMonitor
from adaptserve.config import PrecisionConfig
from adaptserve.model.projection import NATIVE

TOP = PRECISIONS[0]  # the controller's highest level: the bf16 copy if held, else the native weights
IN_FLIGHT = 4  # steps whose numbers may be on their way to the host; a fifth waits for the oldest


@dataclass(slots=True)
class _Observation:
    """One served step's numbers on their way to the host."""

    numbers: torch.Tensor  # [2] float32 (pinned on a GPU): the lowest score, shadow agreements
    landed: torch.cuda.Event | None  # recorded after the copy; None on the CPU (landed at once)
    precision: str
    num_rows: int
    shadowed: bool
    signals: ConfidenceSignals  # on the device, for reports (reading them waits)


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
        self._in_flight: deque[_Observation] = deque()
        self._host_buffers: list[torch.Tensor] = []  # pinned [2] float32 each, reused in turn
        self._next_buffer = 0

    def peek(self) -> str:
        """The format the next decode step would be served in (nothing counted or sampled)."""
        return self.controller.precision if self.adaptive else self.fixed

    def choose(self, decode_only: bool) -> tuple[str, str | None]:
        """(the format this step is served in, the format to shadow it with or None)."""
        if not self.adaptive:
            self.steps_by_precision[self.fixed] += 1
            return self.fixed, None
        self._read_landed()
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
        """After a step: start bringing its lowest confidence score and shadow agreement to the host;
        the controller reads them once there (see the module doc). logits, shadow_logits: [N, V] of
        the sampled rows."""
        if not self.adaptive or logits.shape[0] == 0:
            return
        signals = confidence_signals(logits)
        score = confidence_score(signals).min()  # [] the least confident sequence's
        if shadow_logits is None:
            agree = torch.zeros((), device=logits.device)
        else:
            reference, low = (logits, shadow_logits) if precision == TOP else (shadow_logits, logits)
            agree = (reference.argmax(-1) == low.argmax(-1)).sum().float()  # [] top-1 tokens that match
        numbers, landed = self._to_host(torch.stack((score.float(), agree)))  # [2]
        observation = _Observation(
            numbers, landed, precision, logits.shape[0], shadow_logits is not None, signals
        )
        self._in_flight.append(observation)
        self._read_landed()

    def settle(self) -> None:
        """Wait for every step's numbers and let the controller read them (tests, reports)."""
        while self._in_flight:
            if self._in_flight[0].landed is not None:
                self._in_flight[0].landed.synchronize()
            self._read_landed()

    def _read_landed(self) -> None:
        """Feed the controller every observation whose copy has landed, oldest first; past IN_FLIGHT
        waiting ones, wait for the oldest (its pinned buffer is about to be reused)."""
        while self._in_flight:
            oldest = self._in_flight[0]
            if oldest.landed is not None and not oldest.landed.query():
                if len(self._in_flight) <= IN_FLIGHT:
                    return
                oldest.landed.synchronize()
            self._in_flight.popleft()
            score, agree = oldest.numbers.tolist()
            if oldest.shadowed:
                self.quality.record(int(agree), oldest.num_rows)
                self.num_shadowed_tokens += oldest.num_rows
                self.num_shadow_agreements += int(agree)
            self.last_precision, self.last_signals, self.last_score = oldest.precision, oldest.signals, score
            self.controller.decide(score, self.memory_pressure)

    def _to_host(self, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """numbers [2] -> (a host copy on its way, an event recorded after the copy or None when the
        numbers are already on the host)."""
        if not numbers.is_cuda:
            return numbers, None
        host = self._host_buffer().copy_(numbers, non_blocking=True)  # [2] pinned
        landed = torch.cuda.Event()
        landed.record()
        return host, landed

    def _host_buffer(self) -> torch.Tensor:
        """The next of IN_FLIGHT + 1 pinned [2] float32 buffers (one more than may be waiting)."""
        if not self._host_buffers:
            self._host_buffers = [torch.empty(2, pin_memory=True) for _ in range(IN_FLIGHT + 1)]
        buffer = self._host_buffers[self._next_buffer]
        self._next_buffer = (self._next_buffer + 1) % len(self._host_buffers)
        return buffer

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
