"""KV compression on /metrics: blocks held per format, bytes saved against an all-bf16 cache, the
format new blocks are written in, blocks requantized, the sampled errors per format, and the policy's
switches. Built at scrape time from plain numbers (`kv_report_of`), like the precision metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adaptserve.server.precision_metrics import one_metric


@dataclass(frozen=True)
class KVReport:
    write_format: str  # the format new blocks are written in
    blocks: dict[str, int]  # referenced blocks per format
    bytes_saved: float  # bytes those blocks would take more in bf16
    requantized_blocks: int  # blocks moved to a lower format since start
    attention_error: dict[str, float] = field(default_factory=dict)  # format -> sampled, decayed
    reconstruction_error: dict[str, float] = field(default_factory=dict)
    switches: int = 0  # write-format changes since start
    error_reverts: int = 0  # of those, undone because the error budget was broken


def kv_report_of(engine) -> KVReport:
    """A KVReport from an engine with a compressed cache (read without locks: counters only grow)."""
    pool, runner = engine.kv_cache.block_pool, engine.runner
    blocks = pool.usage_by_format()
    native = pool.block_bytes["bf16"]
    saved = sum(n * (native - pool.block_bytes[f]) for f, n in blocks.items()) * engine.arch.num_layers
    monitor = runner.attention.monitor
    log = engine.control.switches if engine.control is not None else None
    switches = sum(n for (knob, _), n in log.counts.items() if knob == "kv_format") if log else 0
    recent = [s for s in log.recent if s.knob == "kv_format"] if log else []
    return KVReport(
        write_format=pool.write_format,
        blocks=blocks,
        bytes_saved=float(saved),
        requantized_blocks=runner.compressed_kv.num_requantized_blocks,
        attention_error=dict(monitor.attention_error),
        reconstruction_error=dict(monitor.reconstruction_error),
        switches=switches,
        error_reverts=sum(1 for s in recent if "budget" in s.reason),  # of the switches the log keeps
    )


class KVCollector(Collector):
    def __init__(self, model_name: str, read: Callable[[], KVReport]):
        self.model_name = model_name
        self.read = read

    def collect(self) -> Iterator[Metric]:
        report, name = self.read(), self.model_name
        blocks = GaugeMetricFamily(
            "adaptserve:kv_blocks", "KV blocks held by requests, per format.", labels=["model_name", "format"]
        )
        for fmt, count in sorted(report.blocks.items()):
            blocks.add_metric([name, fmt], float(count))
        yield blocks
        current = GaugeMetricFamily(
            "adaptserve:kv_write_format",
            "1 for the KV policy's format: cold blocks are requantized into it, and new blocks are written "
            "in it unless it is int4k (new blocks int8) or the hot window is on (new blocks bf16).",
            labels=["model_name", "format"],
        )
        current.add_metric([name, report.write_format], 1.0)
        yield current
        for metric, doc, table in (
            (
                "kv_attention_error",
                "Sampled relative attention-output error per KV format.",
                report.attention_error,
            ),
            (
                "kv_reconstruction_error",
                "Sampled relative K/V reconstruction error per format.",
                report.reconstruction_error,
            ),
        ):
            family = GaugeMetricFamily(f"adaptserve:{metric}", doc, labels=["model_name", "format"])
            for fmt, value in sorted(table.items()):
                family.add_metric([name, fmt], value)
            yield family
        yield one_metric(
            GaugeMetricFamily,
            "kv_bytes_saved",
            "Bytes the held blocks save against bf16.",
            name,
            report.bytes_saved,
        )
        for metric, doc, value in (
            (
                "kv_requantized_blocks",
                "Cold KV blocks requantized to a lower format.",
                report.requantized_blocks,
            ),
            ("kv_format_switches", "Changes of the format new KV blocks are written in.", report.switches),
            (
                "kv_error_reverts",
                "Format changes made because the KV error budget was broken.",
                report.error_reverts,
            ),
        ):
            yield one_metric(CounterMetricFamily, metric, doc, name, value)
