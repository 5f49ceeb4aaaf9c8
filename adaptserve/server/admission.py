"""SLO-aware admission control: say no early (429) instead of accepting work that will miss its SLO.

Signal: the prompt tokens queued ahead of a new request, the running requests' slots, and a step-time
model fitted online to the engine's own steps. Knob: accept or reject, per request. Thresholds: the
TTFT SLO of the request's priority tier; bounded queues by requests and by tokens. Guardrail: the
prediction errs long (it assumes every running request uses all its max_tokens), so what is accepted
meets its SLO and what is rejected is told when to retry.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from adaptserve.engine.scheduler import Scheduler
from adaptserve.engine.stats import StepStats
from adaptserve.server.config import AdmissionConfig


@dataclass(frozen=True)
class Rejection:
    reason: str  # "slo" | "queue_requests" | "queue_tokens"
    message: str
    retry_after_s: int


class AdmissionRejected(Exception):
    def __init__(self, rejection: Rejection):
        super().__init__(rejection.message)
        self.rejection = rejection


class StepTimeModel:
    """step_time ≈ fixed + per_token * scheduled_tokens + per_decode * decode_sequences, by least
    squares over the recent steps. The decode term holds what each sampled sequence costs beyond its
    one token (sampling, bookkeeping, attention over its context)."""

    def __init__(self, window: int = 512, fixed_s: float = 0.02, per_token_s: float = 1e-4):
        self._points: deque[tuple[int, int, float]] = deque(maxlen=window)  # (tokens, decodes, seconds)
        self.fixed_s = fixed_s  # priors until steps of different shapes have been seen
        self.per_token_s = per_token_s
        self.per_decode_s = 0.0

    def record(self, stats: StepStats) -> None:
        if stats.num_scheduled_tokens == 0:
            return
        self._points.append((stats.num_scheduled_tokens, stats.num_decode_sequences, stats.step_time))
        if len(self._points) >= 8 and len(self._points) % 8 == 0:
            self._fit()

    def _fit(self) -> None:
        tokens, decodes, times = np.array(self._points, dtype=np.float64).T  # [N] each
        if tokens.max() - tokens.min() < 16:  # all steps alike: only the mean is known
            self.fixed_s = max(
                0.0, float(times.mean()) - self.step_time(int(tokens.mean()), 0) + self.fixed_s
            )
            return
        ones = np.ones_like(tokens)
        (fixed, per_token, per_decode), *_ = np.linalg.lstsq(
            np.stack([ones, tokens, decodes], axis=1), times, rcond=None
        )
        if per_decode < 0 or per_token <= 0:  # the decode term does not help: one regressor only
            (fixed, per_token), *_ = np.linalg.lstsq(np.stack([ones, tokens], axis=1), times, rcond=None)
            per_decode = 0.0
        self.fixed_s = max(float(fixed), 0.0)
        self.per_token_s = max(float(per_token), 1e-7)
        self.per_decode_s = float(per_decode)

    def step_time(self, num_tokens: int, num_decodes: int = 0) -> float:
        return self.fixed_s + self.per_token_s * num_tokens + self.per_decode_s * num_decodes


class PredictionCalibration:
    """How late real first tokens come against the model's predictions: what the model does not see
    (prompts that arrive in the same gap between steps and are packed into the same step, time in
    HTTP and the event loop, step-time noise) adds a fairly constant delay. A high quantile of
    (actual - predicted) over the recent admitted requests is added to every prediction, so the
    controller corrects itself on a machine it has never seen. Residuals older than `max_age_s` are
    forgotten, so a slow spell (another process on the machine) does not keep inflating predictions
    after it ends."""

    def __init__(
        self,
        quantile: float = 0.9,
        window: int = 256,
        min_samples: int = 16,
        max_age_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.quantile = quantile
        self.min_samples = min_samples
        self.max_age_s = max_age_s
        self._clock = clock
        self._pending: OrderedDict[str, float] = OrderedDict()  # request id → predicted TTFT
        self._residuals: deque[tuple[float, float]] = deque(maxlen=window)  # (time, seconds late)
        self.extra_s = 0.0  # added to predictions; negative when the model runs long

    def expect(self, request_id: str, predicted_s: float) -> None:
        self._pending[request_id] = predicted_s
        if len(self._pending) > 4096:  # requests aborted before their first token
            self._pending.popitem(last=False)

    def record(self, stats: StepStats) -> None:
        now = self._clock()
        num_changed = 0
        for request_id, ttft in zip(stats.first_token_request_ids, stats.time_to_first_token, strict=True):
            predicted_s = self._pending.pop(request_id, None)
            if predicted_s is not None:
                self._residuals.append((now, ttft - predicted_s))
                num_changed += 1
        while self._residuals and self._residuals[0][0] < now - self.max_age_s:
            self._residuals.popleft()
            num_changed += 1
        # the quantile only moves when residuals arrive or age out (most steps bring neither)
        if num_changed:
            if len(self._residuals) >= self.min_samples:
                residuals = [late for _, late in self._residuals]
                self.extra_s = min(60.0, float(np.quantile(residuals, self.quantile)))
            else:
                self.extra_s = 0.0


_LOWEST_PRIORITY = 2**62  # queue_ahead(_LOWEST_PRIORITY) counts every waiting request


class AdmissionController:
    """Predicts a new request's TTFT from the queue ahead; admits it only if that meets its tier's SLO."""

    def __init__(
        self,
        config: AdmissionConfig,
        scheduler: Scheduler,
        step_model: StepTimeModel,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = 10.0,
    ):
        self.config = config
        self.scheduler = scheduler
        self.step_model = step_model
        self._clock = clock
        self._window_s = window_s
        self._admitted: deque[tuple[float, int, float]] = deque()  # (time, priority, engine seconds)
        self.calibration = PredictionCalibration(clock=clock)

    def record(self, stats: StepStats) -> None:
        """A StatLogger: the engine's first tokens calibrate the predictions."""
        self.calibration.record(stats)

    def check(
        self,
        num_prompt_tokens: int,
        max_output_tokens: int,
        priority: int,
        waited_s: float = 0.0,
        request_id: str | None = None,
    ) -> Rejection | None:
        """None to admit; else why not. Called on the engine thread, so the queues hold still.
        `waited_s`: how long the request has already waited since it arrived (it counts toward its TTFT);
        `request_id`: lets the calibration compare its real TTFT with the prediction."""
        num_waiting = len(self.scheduler.waiting)
        if num_waiting >= self.config.max_waiting_requests:
            return self._reject(
                "queue_requests",
                f"the queue is full: {num_waiting} requests waiting "
                f"(max_waiting_requests={self.config.max_waiting_requests})",
                self.predict_ttft(0, priority),
            )
        _, tokens_waiting = self.scheduler.queue_ahead(_LOWEST_PRIORITY)
        if tokens_waiting + num_prompt_tokens > self.config.max_waiting_tokens:
            return self._reject(
                "queue_tokens",
                f"the queue is full: {tokens_waiting} prompt tokens waiting and this request adds "
                f"{num_prompt_tokens} (max_waiting_tokens={self.config.max_waiting_tokens})",
                self.predict_ttft(0, priority),
            )
        if not self.config.enabled:
            return None
        tier = self.config.tier(priority)
        # under the priority policy, more important requests that arrive meanwhile go first: at the
        # recent rate they take a share `load` of the engine, which stretches this wait by 1 / (1 - load)
        load = self._higher_priority_load(priority)
        model_s = math.inf if load >= 0.95 else self.predict_ttft(num_prompt_tokens, priority) / (1.0 - load)
        extra_s = self.calibration.extra_s
        uncalibrated = waited_s + model_s
        predicted = max(waited_s, uncalibrated + extra_s)
        # a prompt too long to meet the SLO even on an idle engine is not the queue's fault: waiting
        # would not help it, so it is admitted unless the queue makes it later still
        alone = max(waited_s, waited_s + self._prefill_s(num_prompt_tokens) + extra_s)
        limit = max(tier.ttft_slo_s * (1.0 - self.config.slo_margin), alone)
        if predicted > limit:
            return self._reject(
                "slo",
                f"server overloaded: predicted time to first token {predicted:.2f}s would miss the "
                f"{tier.name!r} tier's SLO of {tier.ttft_slo_s:g}s (priority {priority}); retry later",
                predicted - limit if math.isfinite(predicted) else tier.ttft_slo_s,
            )
        self._admitted.append(
            (self._clock(), priority, self._engine_seconds(num_prompt_tokens, max_output_tokens))
        )
        if request_id is not None:
            self.calibration.expect(request_id, uncalibrated)
        return None

    def _engine_seconds(self, num_prompt_tokens: int, max_output_tokens: int) -> float:
        """Engine time a request costs: its prompt, and its share of full decode steps (a lower bound)."""
        batch = self.scheduler.config.max_num_seqs
        per_output_token = self.step_model.step_time(batch, batch) / batch
        return self.step_model.per_token_s * num_prompt_tokens + per_output_token * max_output_tokens

    def _higher_priority_load(self, priority: int) -> float:
        """Share of engine time that requests more important than `priority`, admitted over the last
        window, ask for."""
        if not self.scheduler.waiting.by_priority:
            return 0.0
        now = self._clock()
        while self._admitted and self._admitted[0][0] < now - self._window_s:
            self._admitted.popleft()
        if not self._admitted:
            return 0.0
        span = max(1.0, now - self._admitted[0][0])
        return sum(cost for _, p, cost in self._admitted if p < priority) / span

    def predict_ttft(self, num_prompt_tokens: int, priority: int) -> float:
        """Seconds until a request of this size and priority, queued now, gets its first token.

        Its first token comes at the end of the step that computes its last prompt token. The steps
        before cover the prompts ranked ahead of it, and every step carries one token per running
        decode. Less important prompts are not packed into its step (the scheduler starts one priority
        per step); same-priority ones that arrive after it may be, which the calibration covers."""
        scheduler = self.scheduler
        num_waiting_ahead, tokens_ahead = scheduler.queue_ahead(priority)
        mine = tokens_ahead + scheduler.num_running_prefill_tokens() + num_prompt_tokens
        prefill_s = self._prefill_s(mine)
        return prefill_s + self._slot_wait_s(num_waiting_ahead, priority)

    def _prefill_s(self, num_tokens: int) -> float:
        """Steps until `num_tokens` prompt tokens are computed; each also carries one token per
        running decode."""
        config = self.scheduler.config
        num_decodes = min(len(self.scheduler.running), config.max_num_seqs)
        prefill_per_step = max(1, config.max_num_batched_tokens - num_decodes)
        num_steps = max(1, math.ceil(num_tokens / prefill_per_step))
        model = self.step_model
        per_step = model.step_time(0, num_decodes) + model.per_token_s * num_decodes
        return num_steps * per_step + model.per_token_s * num_tokens

    def _slot_wait_s(self, num_waiting_ahead: int, priority: int) -> float:
        """Time until a running slot frees for this request, if max_num_seqs are taken: the running
        requests are assumed to use all their max_tokens (an upper bound). Under the priority policy
        less important running requests yield their slots, so only the others count."""
        running = self.scheduler.running
        if self.scheduler.waiting.by_priority:
            running = [r for r in running if r.priority <= priority]
        max_num_seqs = self.scheduler.config.max_num_seqs
        needed = len(running) + num_waiting_ahead - max_num_seqs + 1  # finishes to wait for
        if needed <= 0 or not running:
            return 0.0
        remaining = sorted(r.max_output_tokens - r.num_output_tokens for r in running)
        rounds, rest = divmod(needed - 1, len(remaining))
        decode_steps = remaining[rest] + rounds * remaining[-1]
        batch = len(self.scheduler.running)
        return decode_steps * self.step_model.step_time(batch, batch)

    def _reject(self, reason: str, message: str, wait_s: float) -> Rejection:
        return Rejection(reason, message, max(1, math.ceil(wait_s)))
