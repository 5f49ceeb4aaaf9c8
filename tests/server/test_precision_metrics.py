"""The precision policy on /metrics: a real StepPrecision fed real logits, scraped through the server's
registry and parsed back with prometheus-client's own parser."""

from __future__ import annotations

import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adaptserve.config import PrecisionConfig
from adaptserve.runner.precision import StepPrecision
from adaptserve.server.metrics import ServerMetrics
from adaptserve.server.precision_metrics import report_of

MODEL = "m"


def scrape(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("adaptserve:precision") or s.name.startswith("adaptserve:weight_format")
    }


def confident_logits(rows: int) -> torch.Tensor:
    logits = torch.full((rows, 32), -20.0)  # [N, V]
    logits[:, 3] = 20.0  # one token takes all the mass: max prob 1, entropy 0, wide margin
    return logits


def test_a_fixed_policy_shows_its_steps_and_format_only():
    precision = StepPrecision(PrecisionConfig(precision_policy="fp8"), ("fp8",))
    metrics = ServerMetrics(MODEL)
    metrics.attach_precision(lambda: report_of(precision, {"native": 400, "fp8": 100}))
    for _ in range(3):
        precision.choose(decode_only=True)
    seen = scrape(metrics)
    assert seen[("adaptserve:precision_steps_total", (("precision", "fp8"),))] == 3
    assert seen[("adaptserve:precision_current", (("precision", "fp8"),))] == 1
    assert seen[("adaptserve:weight_format_bytes", (("format", "fp8"),))] == 100
    assert not any("switches" in name or "agreement" in name for name, _ in seen)


def test_the_adaptive_policy_shows_switches_agreement_and_budget():
    config = PrecisionConfig(precision_policy="adaptive", quality_budget=0.97, shadow_rate=1.0)
    precision = StepPrecision(config, ("fp8", "int4"))
    metrics = ServerMetrics(MODEL)
    metrics.attach_precision(lambda: report_of(precision))
    for _ in range(40):  # confident steps: the controller steps down, every step is shadowed
        served, shadow = precision.choose(decode_only=True)
        logits = confident_logits(2)
        precision.observe(logits, served, None if shadow is None else logits.clone())
    seen = scrape(metrics)
    summary = precision.summary()
    assert summary["switches"] >= 1  # it did leave the top level
    assert seen[("adaptserve:precision_switches_total", ())] == summary["switches"]
    assert seen[("adaptserve:precision_budget", ())] == 0.97
    assert seen[("adaptserve:precision_agreement", ())] == 1.0  # identical shadow logits agree
    assert seen[("adaptserve:precision_current", (("precision", precision.peek()),))] == 1
    served_steps = {labels[0][1]: v for (name, labels), v in seen.items() if name.endswith("steps_total")}
    assert sum(served_steps.values()) == 40 and served_steps.get("bf16", 0) < 40
