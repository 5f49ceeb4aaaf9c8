"""Rolling windows over the engine's own steps: what controllers, the tuner and /metrics read.

`Telemetry` is an engine StatLogger. It keeps the last `max_steps` steps and drops those older than
`window_s`; `snapshot(now, knobs)` summarizes what is left into a frozen TelemetrySnapshot. Signals
that later features report (acceptance rate, confidence, KV error) come in through `report()`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from adaptserve.adapt.knobs import Knobs
from adaptserve.adapt.snapshot import LatencySummary, TelemetrySnapshot
from adaptserve.engine.stats import StepStats

LATER_SIGNALS = ("acceptance_rate", "confidence", "kv_error", "gpu_memory_used")


@dataclass(slots=True)
class _Step:
    """What the windows keep of one step."""

    end: float  # engine clock when its tokens were read
    execute_time: float
    num_scheduled_tokens: int
    num_prefill_tokens: int
    num_decode_sequences: int
    num_context_tokens: int
    num_sequences: int
    num_generation_tokens: int
    num_preemptions: int
    kv_usage: float


def summarize(values: list[float] | np.ndarray) -> LatencySummary:
    if len(values) == 0:
        return LatencySummary()
    data = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(data, (50, 90, 99))
    return LatencySummary(len(data), float(data.mean()), float(p50), float(p90), float(p99))


class Telemetry:
    """Windows by time (`window_s`) and by steps (`max_steps`) over steps, arrivals and latencies.
    `scheduler`, when given, adds the queue's prompt tokens and its oldest request's wait."""

    def __init__(
        self, window_s: float = 10.0, max_steps: int = 4096, scheduler=None, max_samples: int = 8192
    ):
        if window_s <= 0 or max_steps < 1:
            raise ValueError(f"telemetry needs window_s > 0 and max_steps >= 1, got {window_s}, {max_steps}")
        self.window_s = window_s
        self.scheduler = scheduler
        self._steps: deque[_Step] = deque(maxlen=max_steps)
        self._arrivals: deque[tuple[float, int]] = deque(maxlen=max_samples)  # (time, prompt tokens)
        self._ttft: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (time, seconds)
        self._itl: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._tpot: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._finished: deque[float] = deque(maxlen=max_samples)  # finish times
        self._later: dict[str, deque[tuple[float, float]]] = {
            name: deque(maxlen=1024) for name in LATER_SIGNALS
        }
        self.num_running = 0
        self.num_waiting = 0
        self.total_steps = 0
        self._first_time: float | None = None  # earliest time seen: rates are over min(window, since then)

    # ---- input ---------------------------------------------------------------------------------------

    def record(self, stats: StepStats) -> None:
        end = stats.start_time + stats.step_time
        seen = min([stats.start_time, *(t for t, _ in stats.arrivals)])
        self._first_time = seen if self._first_time is None else min(self._first_time, seen)
        self._arrivals.extend(stats.arrivals)
        self._ttft.extend((end, t) for t in stats.time_to_first_token)
        self._itl.extend((end, t) for t in stats.inter_token_latency)
        for finished in stats.finished:
            self._finished.append(end)
            if finished.time_per_output_token is not None:
                self._tpot.append((end, finished.time_per_output_token))
        self.num_running, self.num_waiting = stats.num_running, stats.num_waiting
        if stats.num_scheduled_tokens == 0:
            return  # an abort's stats: no step ran
        self.total_steps += 1
        self._steps.append(
            _Step(
                end,
                stats.execute_time,
                stats.num_scheduled_tokens,
                stats.num_prefill_tokens,
                stats.num_decode_sequences,
                stats.num_context_tokens,
                stats.num_sequences,
                stats.num_generation_tokens,
                stats.num_preemptions,
                stats.kv_cache_usage,
            )
        )

    def report(self, name: str, value: float, now: float) -> None:
        """A later feature's signal (speculation's acceptance rate, KV error), averaged over the window."""
        if name not in self._later:
            raise ValueError(f"unknown telemetry signal {name!r}; known: {', '.join(LATER_SIGNALS)}")
        self._later[name].append((now, float(value)))

    # ---- output --------------------------------------------------------------------------------------

    def steps(self, now: float) -> list[_Step]:
        """The steps that ended within the window."""
        start = now - self.window_s
        return [s for s in self._steps if s.end > start]

    def snapshot(self, now: float, knobs: Knobs) -> TelemetrySnapshot:
        start = now - self.window_s
        steps = self.steps(now)
        # the window is shorter when the engine has not run that long: rates over what was seen
        first_seen = now if self._first_time is None else self._first_time
        span = max(min(self.window_s, now - first_seen), 1e-3)
        arrivals = [(t, n) for t, n in self._arrivals if t > start]
        decode_histogram: dict[int, int] = {}
        for s in steps:
            if s.num_decode_sequences:
                decode_histogram[s.num_decode_sequences] = decode_histogram.get(s.num_decode_sequences, 0) + 1
        later = {name: _mean_since(samples, start) for name, samples in self._later.items()}
        waiting_tokens, oldest_wait = self._queue(now)
        return TelemetrySnapshot(
            time=now,
            window_s=span,
            knobs=knobs.replace(),
            num_steps=len(steps),
            step_time=summarize([s.execute_time for s in steps]),
            busy_fraction=min(1.0, sum(s.execute_time for s in steps) / span),
            arrival_rate=len(arrivals) / span,
            arrival_prompt_tokens_rate=sum(n for _, n in arrivals) / span,
            completion_rate=sum(1 for t in self._finished if t > start) / span,
            generation_tokens_rate=sum(s.num_generation_tokens for s in steps) / span,
            prefill_tokens_rate=sum(s.num_prefill_tokens for s in steps) / span,
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            waiting_prompt_tokens=waiting_tokens,
            oldest_waiting_s=oldest_wait,
            mean_decode_batch=float(np.mean([s.num_decode_sequences for s in steps])) if steps else 0.0,
            context_per_sequence=_context_per_sequence(steps),
            ttft=summarize([v for t, v in self._ttft if t > start]),
            tpot=summarize([v for t, v in self._tpot if t > start]),
            itl=summarize([v for t, v in self._itl if t > start]),
            kv_usage=steps[-1].kv_usage if steps else 0.0,
            kv_usage_max=max((s.kv_usage for s in steps), default=0.0),
            preemptions=sum(s.num_preemptions for s in steps),
            gpu_memory_used=later["gpu_memory_used"],
            acceptance_rate=later["acceptance_rate"],
            confidence=later["confidence"],
            kv_error=later["kv_error"],
            decode_batch_histogram=decode_histogram,
        )

    def _queue(self, now: float) -> tuple[int, float]:
        if self.scheduler is None:
            return 0, 0.0
        waiting = list(self.scheduler.waiting)
        tokens = sum(r.num_tokens - r.num_computed_tokens for r in waiting)
        oldest = max((now - r.arrival_time for r in waiting), default=0.0)
        return tokens, max(0.0, oldest)


def _mean_since(samples: deque[tuple[float, float]], start: float) -> float | None:
    values = [v for t, v in samples if t > start]
    return float(np.mean(values)) if values else None


def _context_per_sequence(steps: list[_Step]) -> float:
    sequences = sum(s.num_sequences for s in steps)
    return sum(s.num_context_tokens for s in steps) / sequences if sequences else 0.0
