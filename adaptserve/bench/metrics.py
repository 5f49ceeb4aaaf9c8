"""Serving-benchmark metrics, computed as vLLM's `vllm bench serve` computes them.

Every latency is measured by the client in seconds and reported in milliseconds. Only successful
requests enter the latency statistics and the input-token total; a failed request counts in `failed`
and adds no output tokens. TPOT is `(latency - ttft) / (output_len - 1)`, so it is left out for a
request of one token (for goodput that request's TPOT is 0). ITL is per chunk, not per token: a chunk
that carries several tokens is one gap, which is why TPOT, not ITL, is the per-token number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
# metric -> (short name, section heading), as vLLM prints them
METRIC_TITLES = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}


@dataclass(slots=True)
class RequestOutcome:
    """What the client measured for one request (times in seconds)."""

    success: bool
    prompt_len: int
    ttft: float = 0.0  # just before the POST -> first chunk with choices (queueing included)
    itl: list[float] = field(default_factory=list)  # gaps between consecutive chunks with choices (per chunk)
    latency: float = 0.0  # E2EL: POST -> last chunk with choices
    output_tokens: int | None = None  # from the response's `usage.completion_tokens`
    start_time: float = 0.0  # dispatch time relative to the benchmark start (for plots)
    error: str = ""


def output_len(outcome: RequestOutcome) -> int:
    """Tokens a request generated: `usage.completion_tokens`, else one per chunk (`len(itl) + 1`).

    The fallback undercounts when the server packs several tokens into one chunk; vLLM re-tokenizes the
    text instead, which we avoid so the metrics need no tokenizer. Failed requests generated 0.
    """
    if not outcome.success:
        return 0
    if outcome.output_tokens is not None:
        return outcome.output_tokens
    return len(outcome.itl) + 1


def tpot(outcome: RequestOutcome) -> float | None:
    """Time per output token after the first, in seconds; None when the request made <= 1 token."""
    num_tokens = output_len(outcome)
    if num_tokens <= 1:
        return None
    return (outcome.latency - outcome.ttft) / (num_tokens - 1)


def max_concurrent_requests(outcomes: list[RequestOutcome]) -> int:
    """Most successful requests in flight at once, each over `[start_time, start_time + latency)`.

    Intervals are half-open: a request that ends exactly when another starts does not overlap it.
    """
    events = []  # (time, +1 start | -1 end); at equal times ends sort before starts
    for outcome in outcomes:
        if outcome.success:
            events.append((outcome.start_time, 1))
            events.append((outcome.start_time + outcome.latency, -1))
    in_flight = peak = 0
    for _, delta in sorted(events):
        in_flight += delta
        peak = max(peak, in_flight)
    return peak


def percentile_key(p: float) -> str:
    """vLLM's spelling of a percentile in a key: 99.0 -> '99', 99.9 -> '99.9'."""
    return str(int(p)) if int(p) == p else str(p)


def metric_stats(name: str, values_s: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    """Mean, median, population std and percentiles in ms; 0.0 for every stat when there are no samples."""
    x = values_s or 0  # vLLM's `np.mean(x or 0)`: an empty list gives 0, not NaN
    stats = {
        f"mean_{name}_ms": float(np.mean(x)) * 1000,
        f"median_{name}_ms": float(np.median(x)) * 1000,
        f"std_{name}_ms": float(np.std(x)) * 1000,
    }
    for p in percentiles:
        stats[f"p{percentile_key(p)}_{name}_ms"] = float(np.percentile(x, p)) * 1000
    return stats


def count_good(outcomes: list[RequestOutcome], slos_ms: dict[str, float]) -> int:
    """Successful requests that meet every SLO (metric <= slo); a 1-token request's TPOT is 0."""
    num_good = 0
    for outcome in outcomes:
        if not outcome.success:
            continue
        values_s = {"ttft": outcome.ttft, "tpot": tpot(outcome) or 0.0, "e2el": outcome.latency}
        if all(values_s[name] <= slo_ms / 1000 for name, slo_ms in slos_ms.items()):
            num_good += 1
    return num_good


def calculate_metrics(
    outcomes: list[RequestOutcome],
    duration_s: float,
    percentile_metrics: tuple[str, ...] = PERCENTILE_METRICS,
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0),
    goodput_slos_ms: dict[str, float] | None = None,
) -> dict[str, Any]:
    """vLLM's benchmark result dict for `outcomes` over `duration_s` (first dispatch to last completion).

    `request_goodput` is None when no SLOs are given. Per-request lists are kept for plots: `ttfts`,
    `e2els`, `itls` of successful requests; `input_lens`, `output_lens`, `start_times`, `errors` of all.
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    for name in percentile_metrics:
        if name not in PERCENTILE_METRICS:
            raise ValueError(f"unknown percentile metric {name!r}; allowed: {', '.join(PERCENTILE_METRICS)}")
    percentiles = tuple(check_percentile(p, str(p)) for p in percentiles)
    for name, slo_ms in (goodput_slos_ms or {}).items():
        check_slo(name, slo_ms, f"{name}:{slo_ms}")

    done = [o for o in outcomes if o.success]
    output_lens = [output_len(o) for o in outcomes]
    total_input = sum(o.prompt_len for o in done)
    total_output = sum(output_lens)
    samples_s = {
        "ttft": [o.ttft for o in done],
        "tpot": [t for t in map(tpot, done) if t is not None],
        "itl": [gap for o in done for gap in o.itl],
        "e2el": [o.latency for o in done],
    }
    good = count_good(outcomes, goodput_slos_ms) if goodput_slos_ms else None
    metrics: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "request_goodput": None if good is None else good / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "max_concurrent_requests": max_concurrent_requests(outcomes),
    }
    for name in percentile_metrics:
        metrics.update(metric_stats(name, samples_s[name], percentiles))
    metrics.update(
        ttfts=samples_s["ttft"],
        e2els=samples_s["e2el"],
        itls=[list(o.itl) for o in done],
        input_lens=[o.prompt_len for o in outcomes],
        output_lens=output_lens,
        start_times=[o.start_time for o in outcomes],
        errors=[o.error for o in outcomes],
    )
    return metrics


def check_percentile(p: float, item: str) -> float:
    """`p` as a float if 0 < p <= 100, else a ValueError naming `item`."""
    if not 0 < p <= 100:
        raise ValueError(f"bad percentile {item!r}: must be a number with 0 < p <= 100")
    return float(p)


def check_slo(name: str, slo_ms: float, item: str) -> None:
    """A ValueError naming `item` unless `name` is a goodput metric and `slo_ms` > 0."""
    if name not in GOODPUT_METRICS:
        raise ValueError(f"bad goodput SLO {item!r}: unknown metric; allowed: {', '.join(GOODPUT_METRICS)}")
    if not slo_ms > 0:
        raise ValueError(f"bad goodput SLO {item!r}: the value (ms) must be > 0")


def parse_goodput(items: list[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> `{"ttft": 500.0, "tpot": 50.0}` (SLOs in ms)."""
    slos_ms: dict[str, float] = {}
    for item in items:
        name, colon, value = item.partition(":")
        name = name.strip()
        if not colon:
            raise ValueError(f"bad goodput SLO {item!r}: expected 'metric:ms', e.g. 'ttft:500'")
        try:
            slo_ms = float(value)
        except ValueError:
            raise ValueError(f"bad goodput SLO {item!r}: {value.strip()!r} is not a number (ms)") from None
        check_slo(name, slo_ms, item)
        if name in slos_ms:
            raise ValueError(f"bad goodput SLO {item!r}: {name!r} is given twice")
        slos_ms[name] = slo_ms
    return slos_ms


def parse_percentiles(text: str) -> list[float]:
    """`"50,90,99"` -> `[50.0, 90.0, 99.0]`; each must satisfy 0 < p <= 100."""
    percentiles = []
    for item in text.split(","):
        try:
            p = float(item)
        except ValueError:
            raise ValueError(f"bad percentile {item.strip()!r}: must be a number with 0 < p <= 100") from None
        percentiles.append(check_percentile(p, item.strip()))
    return percentiles


def summary_row(label: str, value: Any) -> list[str]:
    """One `label value` line in vLLM's layout (ints as is, floats to 2 places); none for a None value."""
    if value is None:
        return []
    if isinstance(value, (int, np.integer)):
        return [f"{label:<40} {value:<10}".rstrip()]
    return [f"{label:<40} {value:<10.2f}".rstrip()]


def format_summary(metrics: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """A text table like the one `vllm bench serve` prints, from a `calculate_metrics` dict."""
    lines = [f" {title} ".center(50, "=")]
    for label, key in (
        ("Successful requests:", "completed"),
        ("Failed requests:", "failed"),
        ("Peak concurrent requests:", "max_concurrent_requests"),
        ("Benchmark duration (s):", "duration"),
        ("Total input tokens:", "total_input_tokens"),
        ("Total generated tokens:", "total_output_tokens"),
        ("Request throughput (req/s):", "request_throughput"),
        ("Request goodput (req/s):", "request_goodput"),
        ("Output token throughput (tok/s):", "output_throughput"),
        ("Total token throughput (tok/s):", "total_token_throughput"),
    ):
        lines += summary_row(label, metrics.get(key))
    for name in PERCENTILE_METRICS:
        if f"mean_{name}_ms" not in metrics:
            continue
        short, heading = METRIC_TITLES[name]
        lines.append(heading.center(50, "-"))
        lines += summary_row(f"Mean {short} (ms):", metrics[f"mean_{name}_ms"])
        lines += summary_row(f"Median {short} (ms):", metrics[f"median_{name}_ms"])
        for key, value in metrics.items():
            match = re.fullmatch(rf"p([0-9.]+)_{name}_ms", key)
            if match:
                lines += summary_row(f"P{match.group(1)} {short} (ms):", value)
    lines.append("=" * 50)
    return "\n".join(lines)
