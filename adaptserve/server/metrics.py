"""Prometheus metrics, named in the spirit of vLLM's `vllm:*` as `adaptserve:*`.

One registry per server (not the process-global one), fed by the engine's StepStats each step and by
the HTTP layer for what never reaches the engine (invalid and rejected requests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from adaptserve.engine.stats import StepStats

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0
)  # fmt: skip
_TOKEN_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5
)  # fmt: skip

OUTCOMES = ("stop", "length", "abort", "rejected", "invalid", "error")


class ServerMetrics:
    """The server's metrics; `record(stats)` makes it an engine StatLogger."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name}

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, ["model_name", *extra], registry=r)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, ["model_name", *extra], registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=r)

        self._requests = counter("adaptserve:requests", "Requests by outcome.", ("outcome",))
        self._rejected = counter(
            "adaptserve:request_rejected", "Requests refused with 429 or 503.", ("reason",)
        )
        self._prompt_tokens = counter("adaptserve:prompt_tokens", "Prompt tokens of finished requests.")
        self._generation_tokens = counter("adaptserve:generation_tokens", "Tokens generated.")
        self._preemptions = counter("adaptserve:num_preemptions", "Requests preempted (recomputed later).")
        self._prefix_queries = counter(
            "adaptserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self._prefix_hits = counter("adaptserve:prefix_cache_hits", "Of those, tokens found in the cache.")
        self._ttft = histogram(
            "adaptserve:time_to_first_token_seconds", "Arrival to first token.", _LATENCY_BUCKETS
        )
        self._itl = histogram(
            "adaptserve:inter_token_latency_seconds",
            "Gap between consecutive tokens of a request.",
            _TOKEN_LATENCY_BUCKETS,
        )
        self._tpot = histogram(
            "adaptserve:request_time_per_output_token_seconds",
            "Per request: (last token - first token) / (tokens - 1).",
            _TOKEN_LATENCY_BUCKETS,
        )
        self._e2e = histogram(
            "adaptserve:e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS
        )
        self._queue_time = histogram(
            "adaptserve:request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY_BUCKETS
        )
        self._running = gauge("adaptserve:num_requests_running", "Requests in the running batch.")
        self._waiting = gauge("adaptserve:num_requests_waiting", "Requests waiting to be scheduled.")
        self._kv_usage = gauge("adaptserve:kv_cache_usage_perc", "Share of KV-cache blocks in use, 0 to 1.")
        self._hit_rate = gauge(
            "adaptserve:prefix_cache_hit_rate", "Prefix-cache hits / queries since start, 0 to 1."
        )
        self._knobs: dict[str, Gauge] = {}  # one gauge per run-time knob: adaptserve:knob_<name>
        self._gauge = gauge
        self._labels = labels
        self._queries_total = 0
        self._hits_total = 0
        for outcome in OUTCOMES:  # so a scrape shows every outcome, zeros included
            self._requests.labels(outcome=outcome, **labels)

    def record(self, stats: StepStats) -> None:
        """Called on the engine thread after every step (prometheus-client is thread-safe)."""
        labels = self._labels
        self._generation_tokens.labels(**labels).inc(stats.num_generation_tokens)
        self._preemptions.labels(**labels).inc(stats.num_preemptions)
        self._prefix_queries.labels(**labels).inc(stats.prefix_cache_queries)
        self._prefix_hits.labels(**labels).inc(stats.prefix_cache_hits)
        self._queries_total += stats.prefix_cache_queries
        self._hits_total += stats.prefix_cache_hits
        if self._queries_total:
            self._hit_rate.labels(**labels).set(self._hits_total / self._queries_total)
        for seconds in stats.time_to_first_token:
            self._ttft.labels(**labels).observe(seconds)
        for seconds in stats.inter_token_latency:
            self._itl.labels(**labels).observe(seconds)
        for finished in stats.finished:
            self._requests.labels(outcome=finished.finish_reason, **labels).inc()
            self._prompt_tokens.labels(**labels).inc(finished.num_prompt_tokens)
            self._e2e.labels(**labels).observe(finished.e2e_latency)
            self._queue_time.labels(**labels).observe(finished.queue_time)
            if finished.time_per_output_token is not None:
                self._tpot.labels(**labels).observe(finished.time_per_output_token)
        self._running.labels(**labels).set(stats.num_running)
        self._waiting.labels(**labels).set(stats.num_waiting)
        self._kv_usage.labels(**labels).set(stats.kv_cache_usage)

    def record_outcome(self, outcome: str) -> None:
        """A request that ended outside the engine: "invalid" (400/404), "error" (500) or "rejected"."""
        self._requests.labels(outcome=outcome, **self._labels).inc()

    def record_rejection(self, reason: str) -> None:
        self._rejected.labels(reason=reason, **self._labels).inc()
        self.record_outcome("rejected")

    def set_knobs(self, knobs: dict[str, float]) -> None:
        """Publish run-time knob values, one gauge `adaptserve:knob_<name>` each."""
        for name, value in knobs.items():
            if name not in self._knobs:
                self._knobs[name] = self._gauge(f"adaptserve:knob_{name}", f"Run-time knob {name}.")
            self._knobs[name].labels(**self._labels).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
