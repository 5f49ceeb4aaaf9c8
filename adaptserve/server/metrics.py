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
        self.model_name = model_name
        r = self.registry

        # metrics with only the model label are bound to it once, here, not on every step
        def counter(name: str, doc: str):
            return Counter(name, doc, ["model_name"], registry=r).labels(model_name)

        def gauge(name: str, doc: str):
            return Gauge(name, doc, ["model_name"], registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=r).labels(model_name)

        self._requests = Counter(
            "adaptserve:requests", "Requests by outcome.", ["model_name", "outcome"], registry=r
        )
        self._rejected = Counter(
            "adaptserve:request_rejected",
            "Requests refused with 429 or 503.",
            ["model_name", "reason"],
            registry=r,
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
        self._prefix_totals = [0, 0]  # queries, hits since this registry was made
        for outcome in OUTCOMES:  # so a scrape shows every outcome, zeros included
            self._requests.labels(model_name, outcome)

    def record(self, stats: StepStats) -> None:
        """Called on the engine thread after every step (prometheus-client is thread-safe)."""
        self._generation_tokens.inc(stats.num_generation_tokens)
        self._preemptions.inc(stats.num_preemptions)
        self._prefix_queries.inc(stats.prefix_cache_queries)
        self._prefix_hits.inc(stats.prefix_cache_hits)
        # the rate over what these counters saw (the engine's own totals include the warm-up)
        self._prefix_totals[0] += stats.prefix_cache_queries
        self._prefix_totals[1] += stats.prefix_cache_hits
        if self._prefix_totals[0]:
            self._hit_rate.set(self._prefix_totals[1] / self._prefix_totals[0])
        for seconds in stats.time_to_first_token:
            self._ttft.observe(seconds)
        for seconds in stats.inter_token_latency:
            self._itl.observe(seconds)
        for finished in stats.finished:
            self._requests.labels(self.model_name, finished.finish_reason).inc()
            self._prompt_tokens.inc(finished.num_prompt_tokens)
            self._e2e.observe(finished.e2e_latency)
            self._queue_time.observe(finished.queue_time)
            if finished.time_per_output_token is not None:
                self._tpot.observe(finished.time_per_output_token)
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        self._kv_usage.set(stats.kv_cache_usage)

    def record_outcome(self, outcome: str) -> None:
        """A request that ended outside the engine: "invalid" (400/404), "error" (500) or "rejected"."""
        self._requests.labels(self.model_name, outcome).inc()

    def record_rejection(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()
        self.record_outcome("rejected")

    def set_knobs(self, knobs: dict[str, float]) -> None:
        """Publish run-time knob values, one gauge `adaptserve:knob_<name>` each."""
        for name, value in knobs.items():
            if name not in self._knobs:
                self._knobs[name] = self._gauge(f"adaptserve:knob_{name}", f"Run-time knob {name}.")
            self._knobs[name].set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
