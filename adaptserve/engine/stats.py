"""What one engine step did, as plain data, for metrics, admission control and later controllers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class FinishedRequestStats:
    """One user request (all n completions) that ended in this step."""

    finish_reason: str  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_generation_tokens: int  # over all n completions
    e2e_latency: float  # arrival → finish, seconds
    queue_time: float  # arrival → first scheduled
    time_per_output_token: float | None  # (finish - first token) / (tokens - 1); None for one token


@dataclass
class StepStats:
    """Counts are for this step only; gauges are their value after it."""

    start_time: float  # time.monotonic() when the step began
    step_time: float  # seconds from schedule to reading its tokens (spans two steps under async scheduling)
    num_scheduled_tokens: int  # tokens whose K/V was computed (prompt chunks + decodes)
    num_prefill_tokens: int  # of those, tokens of prompts or recomputed preempted requests (and drafts)
    num_decode_sequences: int  # sequences that computed exactly one token to sample the next
    num_generation_tokens: int  # tokens sampled
    num_preemptions: int
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int
    execute_time: float = 0.0  # seconds the device spent on it: from its launch or the last step's end
    num_context_tokens: int = 0  # K/V tokens its attention reads: each sequence's computed + new tokens
    num_sequences: int = 0  # sequences scheduled (prompt chunks and decodes)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # added since: (time, prompt tokens)
    num_running: int = 0  # gauges: filled in just before the stats are published
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # share of KV blocks in use, [0, 1]
    time_to_first_token: list[float] = field(default_factory=list)  # arrival → first token, seconds
    first_token_request_ids: list[str] = field(default_factory=list)  # user request of each of those
    inter_token_latency: list[float] = field(default_factory=list)  # gap since the previous token
    finished: list[FinishedRequestStats] = field(default_factory=list)
    num_drafts: int = 0  # sequences that verified drafts in this step
    num_draft_tokens: int = 0  # drafted tokens verified
    num_accepted_tokens: int = 0  # of those, accepted
    drafter: str = ""  # the drafter that proposed them ("" without speculation)
    draft_len: int = 0  # the speculation policy's most drafts per request (the knob), when speculating


class StatLogger(Protocol):
    """Anything that wants each step's stats (Prometheus metrics, the admission step-time model)."""

    def record(self, stats: StepStats) -> None: ...


def step_stats_of(
    scheduled,
    start: float,
    execute_start: float,
    now: float,
    num_generation_tokens: int,
    prefix_cache_delta: tuple[int, int],
    arrivals: list[tuple[float, int]],
) -> StepStats:
    """A finished step's counts from its SchedulerOutput (gauges are filled in when it is published)."""
    num_decodes = sum(  # a sequence verifying drafts is a decode too: its extra tokens are drafts
        1 for seq in scheduled.sequences if seq.sample and len(seq.token_ids) - seq.num_draft_tokens == 1
    )
    return StepStats(
        start_time=start,
        step_time=now - start,
        execute_time=now - execute_start,
        num_context_tokens=sum(s.num_computed_tokens + len(s.token_ids) for s in scheduled.sequences),
        num_sequences=len(scheduled.sequences),
        arrivals=arrivals,
        num_scheduled_tokens=scheduled.num_batched_tokens,
        num_prefill_tokens=scheduled.num_batched_tokens - num_decodes,
        num_decode_sequences=num_decodes,
        num_generation_tokens=num_generation_tokens,
        num_preemptions=len(scheduled.preempted_request_ids),
        prefix_cache_queries=prefix_cache_delta[0],
        prefix_cache_hits=prefix_cache_delta[1],
    )


def stamp_token_time(request, parent_id: str, now: float, stats: StepStats) -> None:
    """Record a request's new token: its time to first token, or the gap since its last token."""
    if request.first_token_time is None:
        request.first_token_time = now
        stats.time_to_first_token.append(now - request.arrival_time)
        stats.first_token_request_ids.append(parent_id)
    else:
        stats.inter_token_latency.append(now - request.last_token_time)
    request.last_token_time = now
