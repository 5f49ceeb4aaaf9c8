"""Calibration plumbing on the tiny random model: steps recorded with their shapes, a replay that
respects arrival times, a fit, and where profiles live. (Fidelity on SmolLM2: test_fidelity.py.)"""

import pytest

from adaptserve import LLM
from adaptserve.bench.workloads import BenchRequest
from adaptserve.engine.stats import StepStats
from adaptserve.sim.calibrate import PROFILES_DIR, StepRecorder, calibrate, model_label, profile_path, replay


def stats(num_tokens: int, execute_time: float, step_time: float) -> StepStats:
    return StepStats(
        start_time=0.0,
        step_time=step_time,
        num_scheduled_tokens=num_tokens,
        num_prefill_tokens=num_tokens,
        num_decode_sequences=0,
        num_generation_tokens=1,
        num_preemptions=0,
        prefix_cache_queries=0,
        prefix_cache_hits=0,
        execute_time=execute_time,
        num_context_tokens=num_tokens + 5,
        num_sequences=2,
    )


def test_the_recorder_keeps_shapes_with_the_chosen_time():
    for timing, seconds in (("execute", 0.01), ("step", 0.03)):
        recorder = StepRecorder(timing)
        recorder.record(stats(8, 0.01, 0.03))
        recorder.record(stats(0, 0.0, 0.0))  # an abort: no step ran
        (point,) = recorder.points
        assert (point.num_tokens, point.num_sequences, point.num_context_tokens) == (8, 2, 13)
        assert point.seconds == seconds
    with pytest.raises(ValueError, match="unknown timing"):
        StepRecorder("cpu")


def tiny_engine():
    return LLM("tiny", max_model_len=256, num_blocks=64, async_scheduling=False).engine


def test_replay_feeds_requests_at_their_times_and_times_each_step():
    engine = tiny_engine()
    recorder = StepRecorder("wall")
    engine.stat_loggers.append(recorder)
    requests = [BenchRequest([300] * 20, 20, 5), BenchRequest([301] * 30, 30, 3)]
    tracks = replay(engine, requests, [0.0, 0.05], recorder)
    assert [t.num_output_tokens for t in tracks] == [5, 3]
    assert tracks[1].arrival_time - tracks[0].arrival_time == pytest.approx(0.05)
    assert tracks[1].chunk_times[0] >= tracks[1].arrival_time
    assert len(recorder.points) >= 5 and all(p.seconds > 0 for p in recorder.points)
    assert all(t.outcome().success for t in tracks)


def test_calibrate_fits_the_engine_steps():
    engine = tiny_engine()
    model = calibrate(engine, max_prompt_len=128, device="test")
    assert model.device == "test" and model.num_points >= 20
    assert min(model.fixed_s, model.per_token_s, model.per_sequence_s, model.per_context_s) >= 0
    assert model.predict(128, 1, 128) > 0
    assert engine.stat_loggers == [] and not engine.has_unfinished_requests()


def test_profiles_are_named_by_device_and_model():
    assert profile_path("cpu", model_label(None)) == PROFILES_DIR / "cpu-smollm2-135m.json"
    assert profile_path("H100", "llama-3.1-8b").name == "h100-llama-3.1-8b.json"
    assert model_label("/models/Qwen3-0.6B") == "qwen3-0.6b"
