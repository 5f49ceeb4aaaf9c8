"""ServerMetrics with a control plane attached: knob switches are counted by knob and controller, the
knob gauges follow, and the telemetry window is exported as adaptserve:telemetry_* gauges."""

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adaptserve.adapt.control_plane import ControlPlane
from adaptserve.adapt.knobs import Decision, Knobs
from adaptserve.adapt.telemetry import Telemetry
from adaptserve.engine.stats import StepStats
from adaptserve.server.metrics import ServerMetrics

MODEL = "tiny"
STEP_TIMES = (0.01, 0.02, 0.03, 0.04)
DECODE_BATCHES = (2, 4, 4, 6)


class HalveSeqs:
    """Asks for max_num_seqs=32 once."""

    name = "halver"

    def decide(self, snapshot):
        if snapshot.knobs.max_num_seqs == 32:
            return None
        return Decision({"max_num_seqs": 32}, "test: halve max_num_seqs")


def step(start, execute_time, num_decodes, **extra):
    return StepStats(
        start_time=start,
        step_time=execute_time,
        execute_time=execute_time,
        num_scheduled_tokens=num_decodes,
        num_prefill_tokens=0,
        num_decode_sequences=num_decodes,
        num_generation_tokens=num_decodes,
        num_preemptions=0,
        prefix_cache_queries=0,
        prefix_cache_hits=0,
        **extra,
    )


def fed_telemetry() -> Telemetry:
    telemetry = Telemetry(window_s=10.0)
    for i, (seconds, batch) in enumerate(zip(STEP_TIMES, DECODE_BATCHES, strict=True)):
        extra = {"arrivals": [(0.5, 10), (0.6, 20)]} if i == 0 else {}
        if i == 3:
            extra = {"kv_cache_usage": 0.5, "time_to_first_token": [0.2, 0.4]}
        stats = step(1.0 + i, seconds, batch, **extra)
        stats.num_preemptions = int(i == 3)
        telemetry.record(stats)
    return telemetry


def samples(metrics: ServerMetrics) -> list:
    text = metrics.render().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found, name, **labels):
    matches = [s.value for s in found if s.name == name and labels.items() <= s.labels.items()]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
    return matches[0]


def names(found):
    return {s.name for s in found}


def plane_with_metrics():
    telemetry = fed_telemetry()
    applied = []
    plane = ControlPlane(Knobs(), [HalveSeqs()], telemetry, lambda name, v: applied.append((name, v)))
    metrics = ServerMetrics(MODEL)
    metrics.attach_control(plane, telemetry)
    return plane, telemetry, metrics, applied


def test_switch_counter_and_knob_gauge():
    plane, _, metrics, applied = plane_with_metrics()
    before = samples(metrics)
    assert value(before, "adaptserve:knob_max_num_seqs", model_name=MODEL) == 64
    assert "adaptserve:knob_switches_total" not in names(before)  # no switch yet
    plane.after_step(10.0)
    plane.after_step(20.0)  # the controller is satisfied: no second switch
    assert applied == [("max_num_seqs", 32)]
    found = samples(metrics)
    labels = {"model_name": MODEL, "knob": "max_num_seqs", "controller": "halver"}
    assert value(found, "adaptserve:knob_switches_total", **labels) == 1
    assert value(found, "adaptserve:knob_max_num_seqs", model_name=MODEL) == 32
    assert value(found, "adaptserve:knob_batch_wait_s", model_name=MODEL) == 0.0


def test_switches_before_attaching_are_counted():
    telemetry = fed_telemetry()
    plane = ControlPlane(Knobs(), [HalveSeqs()], telemetry, lambda name, v: None)
    plane.after_step(10.0)
    metrics = ServerMetrics(MODEL)
    metrics.attach_control(plane, telemetry)
    found = samples(metrics)
    assert value(found, "adaptserve:knob_switches_total", knob="max_num_seqs", controller="halver") == 1
    assert value(found, "adaptserve:knob_max_num_seqs") == 32


def test_telemetry_window_gauges():
    plane, _, metrics, _ = plane_with_metrics()
    plane.after_step(10.0)
    snapshot = plane.last_snapshot
    found = samples(metrics)
    p50, p90, p99 = np.percentile(STEP_TIMES, (50, 90, 99))
    for quantile, expected in (("0.5", p50), ("0.9", p90), ("0.99", p99)):
        got = value(found, "adaptserve:telemetry_step_time_seconds", quantile=quantile)
        assert got == pytest.approx(expected)
    assert value(found, "adaptserve:telemetry_mean_decode_batch") == pytest.approx(np.mean(DECODE_BATCHES))
    assert value(found, "adaptserve:telemetry_busy_fraction") == pytest.approx(snapshot.busy_fraction)
    assert snapshot.arrival_rate > 0
    assert value(found, "adaptserve:telemetry_arrival_rate") == pytest.approx(snapshot.arrival_rate)
    assert value(found, "adaptserve:telemetry_kv_usage_max") == 0.5
    assert value(found, "adaptserve:telemetry_preemptions") == 1
    assert value(found, "adaptserve:telemetry_ttft_seconds", quantile="0.5") == pytest.approx(0.3)
    assert value(found, "adaptserve:telemetry_waiting_prompt_tokens") == 0
    assert value(found, "adaptserve:telemetry_oldest_waiting_seconds") == 0
    exported = names(found)
    # no TPOT or ITL samples in the window, and no feature reported a later signal: left out
    assert not exported & {"adaptserve:telemetry_tpot_seconds", "adaptserve:telemetry_itl_seconds"}
    for later in ("acceptance_rate", "confidence", "kv_error", "gpu_memory_used"):
        assert f"adaptserve:telemetry_{later}" not in exported


def test_later_signals_appear_once_reported():
    plane, telemetry, metrics, _ = plane_with_metrics()
    telemetry.report("acceptance_rate", 0.6, 9.0)
    telemetry.report("acceptance_rate", 0.8, 9.5)
    telemetry.report("gpu_memory_used", 0.9, 9.5)
    plane.after_step(10.0)
    found = samples(metrics)
    assert value(found, "adaptserve:telemetry_acceptance_rate") == pytest.approx(0.7)
    assert value(found, "adaptserve:telemetry_gpu_memory_used") == pytest.approx(0.9)
    assert "adaptserve:telemetry_confidence" not in names(found)


def test_window_without_controllers_is_read_from_telemetry():
    telemetry = fed_telemetry()
    plane = ControlPlane(Knobs(), [], telemetry, lambda name, v: None)
    metrics = ServerMetrics(MODEL)
    metrics.attach_control(plane, telemetry, clock=lambda: 10.0)
    plane.after_step(10.0)  # no controllers: the plane takes no snapshot
    assert plane.last_snapshot is None
    found = samples(metrics)
    assert value(found, "adaptserve:telemetry_steps") == len(STEP_TIMES)
    assert value(found, "adaptserve:telemetry_mean_decode_batch") == pytest.approx(np.mean(DECODE_BATCHES))


def test_record_snapshot_without_a_control_plane():
    metrics = ServerMetrics(MODEL)
    assert "adaptserve:telemetry_steps" not in names(samples(metrics))
    snapshot = fed_telemetry().snapshot(10.0, Knobs())
    metrics.record_snapshot(snapshot)
    assert value(samples(metrics), "adaptserve:telemetry_steps") == len(STEP_TIMES)
