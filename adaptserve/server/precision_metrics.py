"""The weight-precision policy on /metrics: steps served per format, the format now served, switches,
the shadowed top-1 agreement and its budget, and the bytes each held weight format takes.

Built at scrape time from `StepPrecision.summary()` (a few plain numbers), so nothing runs on the
engine thread. A fixed policy shows its step count and format; switches and agreement exist only for
the adaptive policy and are left out otherwise (a 0 would read as "never switched" or "never agrees").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class PrecisionReport:
    """What the runner's precision policy says about itself, as plain data."""

    current: str  # the format the next decode step is served in
    steps: dict[str, int]  # steps served per format since start
    switches: int | None = None  # adaptive only: precision changes since start
    agreement: float | None = None  # adaptive only: shadowed top-1 agreement in the monitor's window
    budget: float | None = None  # adaptive only: the agreement the monitor must keep
    breaches: int | None = None  # adaptive only: times the agreement fell below the budget
    format_bytes: dict[str, int] = field(default_factory=dict)  # bytes per held weight format


def report_of(precision, format_bytes: dict[str, int] | None = None) -> PrecisionReport:
    """A PrecisionReport from a runner's `StepPrecision` (read without locks: counters only grow)."""
    summary = precision.summary()
    steps = {k.removeprefix("steps_"): int(v) for k, v in summary.items() if k.startswith("steps_")}
    quality = precision.quality
    return PrecisionReport(
        current=precision.peek(),
        steps=steps,
        switches=summary.get("switches"),
        agreement=summary.get("agreement"),
        budget=None if quality is None else quality.budget,
        breaches=None if quality is None else quality.num_breaches,
        format_bytes=dict(format_bytes or {}),
    )


class PrecisionCollector(Collector):
    def __init__(self, model_name: str, read: Callable[[], PrecisionReport]):
        self.model_name = model_name
        self.read = read

    def collect(self) -> Iterator[Metric]:
        report, name = self.read(), self.model_name
        steps = CounterMetricFamily(
            "adaptserve:precision_steps",
            "Engine steps served in each weight format.",
            labels=["model_name", "precision"],
        )
        for precision, count in sorted(report.steps.items()):
            steps.add_metric([name, precision], count)
        yield steps
        current = GaugeMetricFamily(
            "adaptserve:precision_current",
            "1 for the weight format the next decode step is served in.",
            labels=["model_name", "precision"],
        )
        current.add_metric([name, report.current], 1.0)
        yield current
        if report.format_bytes:
            held = GaugeMetricFamily(
                "adaptserve:weight_format_bytes",
                "Bytes of projection weights held per format (native = as loaded).",
                labels=["model_name", "format"],
            )
            for fmt, size in sorted(report.format_bytes.items()):
                held.add_metric([name, fmt], float(size))
            yield held
        if report.switches is not None:
            yield one_metric(
                CounterMetricFamily, "precision_switches", "Precision changes.", name, report.switches
            )
        for attr, doc in (
            ("agreement", "Shadowed top-1 agreement of low-precision steps with the top level (window)."),
            ("budget", "The agreement the quality monitor keeps; below it precision goes up."),
        ):
            value = getattr(report, attr)
            if value is not None:
                yield one_metric(GaugeMetricFamily, f"precision_{attr}", doc, name, value)
        if report.breaches is not None:
            yield one_metric(
                CounterMetricFamily,
                "precision_quality_breaches",
                "Times the agreement fell below the budget.",
                name,
                report.breaches,
            )


def one_metric(kind, metric: str, doc: str, model_name: str, value: float) -> Metric:
    """A family of one sample labelled by the model (the KV metrics use it too)."""
    family = kind(f"adaptserve:{metric}", doc, labels=["model_name"])
    family.add_metric([model_name], float(value))
    return family
