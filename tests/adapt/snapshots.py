"""Hand-made telemetry snapshots and step stats for controller tests."""

from adaptserve.adapt.knobs import Knobs
from adaptserve.adapt.snapshot import LatencySummary, TelemetrySnapshot
from adaptserve.engine.stats import StepStats


def snapshot(time=0.0, knobs=None, **fields) -> TelemetrySnapshot:
    return TelemetrySnapshot(time=time, window_s=10.0, knobs=knobs or Knobs(), **fields)


def latency(p90: float, count: int = 10) -> LatencySummary:
    return LatencySummary(count, p90 * 0.8, p90 * 0.7, p90, p90 * 1.2)


def step_stats(
    end: float, execute_time: float = 0.01, tokens: int = 8, decodes: int = 8, **fields
) -> StepStats:
    return StepStats(
        start_time=end - execute_time,
        step_time=execute_time,
        num_scheduled_tokens=tokens,
        num_prefill_tokens=tokens - decodes,
        num_decode_sequences=decodes,
        num_generation_tokens=decodes,
        num_preemptions=fields.pop("num_preemptions", 0),
        prefix_cache_queries=0,
        prefix_cache_hits=0,
        execute_time=execute_time,
        num_context_tokens=fields.pop("num_context_tokens", decodes * 100),
        num_sequences=fields.pop("num_sequences", decodes),
        **fields,
    )
