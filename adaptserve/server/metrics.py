"""Prometheus metrics, named in the spirit of vLLM's `vllm:*` as `adaptserve:*`.

One registry per server (not the process-global one), fed by the engine's StepStats each step and by
the HTTP layer for what never reaches the engine (invalid and rejected requests). With a control plane
attached, knob switches are counted as they happen and the telemetry window is read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adaptserve.adapt.control_plane import ControlPlane
from adaptserve.adapt.knobs import Switch
from adaptserve.adapt.snapshot import LatencySummary, TelemetrySnapshot
from adaptserve.adapt.telemetry import LATER_SIGNALS
from adaptserve.engine.stats import StepStats
from adaptserve.server.kv_metrics import KVCollector, KVReport
from adaptserve.server.precision_metrics import PrecisionCollector, PrecisionReport

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

        # speculative decoding, as vLLM's spec_decode counters: acceptance rate = accepted / draft
        # tokens; mean acceptance length = 1 + accepted / drafts (tokens per verify pass)
        def by_drafter(kind: type, name: str, doc: str):
            return kind(name, doc, ["model_name", "drafter"], registry=r)

        self._spec_drafts = by_drafter(
            Counter, "adaptserve:spec_decode_num_drafts", "Sequences that verified drafts (one per step)."
        )
        self._spec_draft_tokens = by_drafter(
            Counter, "adaptserve:spec_decode_num_draft_tokens", "Drafted tokens verified."
        )
        self._spec_accepted_tokens = by_drafter(
            Counter, "adaptserve:spec_decode_num_accepted_tokens", "Drafted tokens accepted."
        )
        self._spec_acceptance_rate = by_drafter(
            Gauge, "adaptserve:spec_decode_acceptance_rate", "Accepted / drafted tokens since start, 0 to 1."
        )
        self._spec_mean_length = by_drafter(
            Gauge,
            "adaptserve:spec_decode_mean_acceptance_length",
            "Tokens per verify pass since start: 1 + accepted / drafts.",
        )
        self._spec_totals: dict[str, list[int]] = {}  # drafter -> [drafts, draft tokens, accepted]
        self._knobs: dict[str, Gauge] = {}  # one gauge per run-time knob: adaptserve:knob_<name>
        self._gauge = gauge
        self._prefix_totals = [0, 0]  # queries, hits since this registry was made
        self._switches: Counter | None = None  # adaptserve:knob_switches_total, once a plane is attached
        self._telemetry: TelemetryCollector | None = None
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
        if stats.drafter:
            self._record_speculation(stats)

    def _record_speculation(self, stats: StepStats) -> None:
        labels = (self.model_name, stats.drafter)
        self.set_knobs({"draft_len": stats.draft_len})
        if not stats.num_drafts:
            return
        self._spec_drafts.labels(*labels).inc(stats.num_drafts)
        self._spec_draft_tokens.labels(*labels).inc(stats.num_draft_tokens)
        self._spec_accepted_tokens.labels(*labels).inc(stats.num_accepted_tokens)
        totals = self._spec_totals.setdefault(stats.drafter, [0, 0, 0])
        totals[0] += stats.num_drafts
        totals[1] += stats.num_draft_tokens
        totals[2] += stats.num_accepted_tokens
        self._spec_acceptance_rate.labels(*labels).set(totals[2] / totals[1])
        self._spec_mean_length.labels(*labels).set(1 + totals[2] / totals[0])

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

    def attach_control(
        self, control_plane: ControlPlane, telemetry=None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Count every knob switch of `control_plane` (by knob and controller), keep the knob gauges
        current, and export its telemetry window at scrape time. `telemetry` (a SnapshotSource, the
        plane's own by default) is read at `clock` (the engine's) only while the plane has taken no
        snapshot of its own (it has no controllers, or no round has run yet). Call once per plane."""
        if self._switches is None:
            self._switches = Counter(
                "adaptserve:knob_switches",
                "Run-time knob changes applied, by knob and by the controller that asked.",
                ["model_name", "knob", "controller"],
                registry=self.registry,
            )
        for (knob, controller), count in control_plane.switches.counts.items():  # switches before now
            self._switches.labels(self.model_name, knob, controller).inc(count)

        def on_switch(switch: Switch) -> None:
            self._switches.labels(self.model_name, switch.knob, switch.controller).inc()
            self.set_knobs(control_plane.knobs.as_gauges())

        control_plane.listeners.append(on_switch)
        self.set_knobs(control_plane.knobs.as_gauges())
        source = control_plane.telemetry if telemetry is None else telemetry
        if self._telemetry is not None:
            self.registry.unregister(self._telemetry)
        self._telemetry = TelemetryCollector(self.model_name, _latest_snapshot(control_plane, source, clock))
        self.registry.register(self._telemetry)

    def attach_kv_compression(self, read: Callable[[], KVReport]) -> None:
        """Export KV compression (`read` is called at scrape time). Call once."""
        self.registry.register(KVCollector(self.model_name, read))

    def attach_precision(self, read: Callable[[], PrecisionReport]) -> None:
        """Export the weight-precision policy (`read` is called at scrape time). Call once."""
        self.registry.register(PrecisionCollector(self.model_name, read))

    def record_snapshot(self, snapshot: TelemetrySnapshot) -> None:
        """Export this snapshot until a newer one comes (for a telemetry window without a control plane)."""
        if self._telemetry is None:
            self._telemetry = TelemetryCollector(self.model_name, lambda: None)
            self.registry.register(self._telemetry)
        self._telemetry.recorded = snapshot

    def render(self) -> bytes:
        return generate_latest(self.registry)


_QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"))
# (gauge name after adaptserve:telemetry_, snapshot field, help) for the plain numbers of a window
_WINDOW_GAUGES = (
    ("window_seconds", "window_s", "Length of the telemetry window the other telemetry gauges cover."),
    ("steps", "num_steps", "Engine steps that finished in the window."),
    ("arrival_rate", "arrival_rate", "Requests arriving per second over the window."),
    ("busy_fraction", "busy_fraction", "Share of the window the device spent in steps, 0 to 1."),
    ("waiting_prompt_tokens", "waiting_prompt_tokens", "Prompt tokens queued and not yet computed."),
    ("oldest_waiting_seconds", "oldest_waiting_s", "How long the oldest waiting request has waited."),
    ("mean_decode_batch", "mean_decode_batch", "Decode sequences per step over the window."),
    ("kv_usage_max", "kv_usage_max", "Highest share of KV blocks in use over the window, 0 to 1."),
    ("preemptions", "preemptions", "Requests preempted in the window."),
)
_LATENCIES = (
    ("step_time_seconds", "step_time", "Per-step execute time over the window."),
    ("ttft_seconds", "ttft", "Time to first token over the window."),
    ("tpot_seconds", "tpot", "Time per output token of requests finished in the window."),
    ("itl_seconds", "itl", "Inter-token latency over the window."),
)
_LATER_HELP = {
    "acceptance_rate": "Speculative decoding: accepted / drafted tokens over the window.",
    "confidence": "Mean logit confidence of decode steps over the window.",
    "kv_error": "KV compression: relative reconstruction error over the window.",
    "gpu_memory_used": "Share of device memory in use, 0 to 1.",
}


class TelemetryCollector(Collector):
    """The latest telemetry window as `adaptserve:telemetry_*` gauges, built at scrape time (nothing
    runs on the engine thread). A latency with no samples in the window, and a later signal that no
    feature reports (None), is left out rather than shown as 0."""

    def __init__(self, model_name: str, latest: Callable[[], TelemetrySnapshot | None]):
        self.model_name = model_name
        self.latest = latest
        self.recorded: TelemetrySnapshot | None = None  # from ServerMetrics.record_snapshot

    def snapshot(self) -> TelemetrySnapshot | None:
        candidates = [s for s in (self.latest(), self.recorded) if s is not None]
        return max(candidates, key=lambda s: s.time, default=None)

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot()
        if snapshot is None:
            return
        for name, field_name, doc in _WINDOW_GAUGES:
            yield self._gauge(name, doc, float(getattr(snapshot, field_name)))
        for name, field_name, doc in _LATENCIES:
            summary: LatencySummary = getattr(snapshot, field_name)
            if summary.count == 0:
                continue
            family = GaugeMetricFamily(
                f"adaptserve:telemetry_{name}", doc + " Quantile by label.", labels=["model_name", "quantile"]
            )
            for label, attr in _QUANTILES:
                family.add_metric([self.model_name, label], getattr(summary, attr))
            yield family
        for name in LATER_SIGNALS:
            value = getattr(snapshot, name)
            if value is not None:
                yield self._gauge(name, _LATER_HELP[name], value)

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"adaptserve:telemetry_{name}", doc, labels=["model_name"])
        family.add_metric([self.model_name], value)
        return family


def _latest_snapshot(
    control_plane: ControlPlane, telemetry, clock: Callable[[], float]
) -> Callable[[], TelemetrySnapshot | None]:
    """The plane's last snapshot; before its first one, a snapshot of `telemetry` taken now."""

    def latest() -> TelemetrySnapshot | None:
        if control_plane.last_snapshot is not None or telemetry is None:
            return control_plane.last_snapshot
        for _ in range(3):  # the engine thread may append to a window while it is read
            try:
                return telemetry.snapshot(clock(), control_plane.knobs)
            except RuntimeError:
                continue
        return None

    return latest
