"""Rolling telemetry windows: rates, percentiles, gauges and later-signal slots from step stats."""

import pytest

from adaptserve.adapt.knobs import Knobs
from adaptserve.adapt.telemetry import Telemetry
from adaptserve.engine.stats import FinishedRequestStats

from .snapshots import step_stats


def test_window_drops_old_steps_and_summarizes_the_rest():
    telemetry = Telemetry(window_s=10.0)
    for i in range(100):  # one step every 0.2 s for 20 s; the first half 10 ms, the second 30 ms
        telemetry.record(step_stats(end=0.2 * (i + 1), execute_time=0.01 if i < 50 else 0.03))
    snap = telemetry.snapshot(20.0, Knobs())
    assert snap.num_steps == 50  # ends in (10, 20]
    assert snap.step_time.p50 == pytest.approx(0.03)
    assert snap.busy_fraction == pytest.approx(50 * 0.03 / 10.0)
    assert snap.mean_decode_batch == 8 and snap.decode_batch_histogram == {8: 50}
    assert snap.context_per_sequence == pytest.approx(100)
    assert snap.generation_tokens_rate == pytest.approx(50 * 8 / 10.0)


def test_arrivals_latencies_and_gauges():
    telemetry = Telemetry(window_s=5.0)
    finished = FinishedRequestStats("stop", 10, 20, 1.0, 0.1, 0.05)
    telemetry.record(
        step_stats(
            end=4.0,
            arrivals=[(1.0, 100), (2.0, 50), (3.5, 10)],
            time_to_first_token=[0.2, 0.4],
            inter_token_latency=[0.01, 0.03],
            finished=[finished],
            num_running=7,
            num_waiting=3,
            kv_cache_usage=0.6,
            num_preemptions=2,
        )
    )
    snap = telemetry.snapshot(5.0, Knobs(max_num_seqs=9))
    assert snap.window_s == pytest.approx(4.0)  # the engine has run for 4 s: rates over those
    assert snap.arrival_rate == pytest.approx(3 / 4.0)
    assert snap.arrival_prompt_tokens_rate == pytest.approx(160 / 4.0)
    assert snap.ttft.count == 2 and snap.ttft.p50 == pytest.approx(0.3)
    assert snap.tpot.mean == pytest.approx(0.05) and snap.itl.p90 == pytest.approx(0.028)
    assert (snap.num_running, snap.num_waiting, snap.kv_usage, snap.preemptions) == (7, 3, 0.6, 2)
    assert snap.knobs.max_num_seqs == 9
    assert snap.acceptance_rate is None and snap.kv_error is None


def test_later_signals_are_averaged_over_the_window_and_unknown_ones_refused():
    telemetry = Telemetry(window_s=10.0)
    telemetry.report("acceptance_rate", 0.2, now=1.0)
    telemetry.report("acceptance_rate", 0.6, now=15.0)
    telemetry.report("acceptance_rate", 0.8, now=16.0)
    assert telemetry.snapshot(20.0, Knobs()).acceptance_rate == pytest.approx(0.7)
    with pytest.raises(ValueError, match="unknown telemetry signal 'speed'"):
        telemetry.report("speed", 1.0, now=1.0)


def test_the_snapshot_holds_a_copy_of_the_knobs():
    knobs = Knobs()
    snap = Telemetry().snapshot(0.0, knobs)
    knobs.max_num_seqs = 1
    assert snap.knobs.max_num_seqs == 64
