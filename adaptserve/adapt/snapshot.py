"""What controllers read: one frozen record of the recent telemetry and the current knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptserve.adapt.knobs import Knobs


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of one latency over the window, seconds; count 0 means no samples (values 0)."""

    count: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0


@dataclass(frozen=True)
class TelemetrySnapshot:
    """The engine as the time window saw it. Rates are per second of the window; gauges are the last
    value. Slots for later signals are None until their feature reports them."""

    time: float  # engine clock when taken, seconds
    window_s: float  # length of the time window the rates and latencies cover
    knobs: Knobs  # the settings in force now
    num_steps: int = 0  # steps that finished in the window
    step_time: LatencySummary = field(default_factory=LatencySummary)  # per-step execute time
    busy_fraction: float = 0.0  # share of the window spent in steps
    arrival_rate: float = 0.0  # requests per second arriving
    arrival_prompt_tokens_rate: float = 0.0  # prompt tokens per second arriving
    completion_rate: float = 0.0  # user requests per second finishing
    generation_tokens_rate: float = 0.0  # tokens sampled per second
    prefill_tokens_rate: float = 0.0  # prompt tokens computed per second
    num_running: int = 0  # gauges after the last step
    num_waiting: int = 0
    waiting_prompt_tokens: int = 0  # prompt tokens queued, not yet computed
    oldest_waiting_s: float = 0.0  # how long the oldest waiting request has waited
    mean_decode_batch: float = 0.0  # decode sequences per step, over the window
    context_per_sequence: float = 0.0  # mean K/V tokens per scheduled sequence, over the window
    ttft: LatencySummary = field(default_factory=LatencySummary)
    tpot: LatencySummary = field(default_factory=LatencySummary)  # of requests finished in the window
    itl: LatencySummary = field(default_factory=LatencySummary)
    kv_usage: float = 0.0  # share of KV blocks in use, last step
    kv_usage_max: float = 0.0  # highest over the window
    preemptions: int = 0  # in the window
    gpu_memory_used: float | None = None  # share of device memory in use (CUDA only)
    acceptance_rate: float | None = None  # speculative decoding: accepted / drafted tokens
    confidence: float | None = None  # mean logit confidence of decode steps
    kv_error: float | None = None  # KV compression: relative reconstruction error
    decode_batch_histogram: dict[int, int] = field(default_factory=dict)  # decode batch size -> steps
