"""The KV load ramp on the real SmolLM2, tiny: arrivals speed up, every request finishes in every
setting, the static bf16 run is the reference's own output, and the adaptive run reports its switches."""

from adaptserve.bench.kv_ramp import _steady_speed, arrival_steps, run_ramp
from adaptserve.model.loaders import load_checkpoint


def test_arrivals_come_closer_together():
    steps = arrival_steps(6, first_gap=4.0, last_gap=1.0)
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert steps[0] == 0 and gaps[0] == 4 and gaps[-1] == 1 and sorted(gaps, reverse=True) == gaps


def test_steady_speed_leaves_out_one_off_steps():
    """Steps past 50x the median (a kernel compiling, a graph capture) count apart; a prompt step at
    12x the median (SmolLM2's on the H100) is a real step."""
    step_ms = [5.0] * 98 + [3300.0, 60.0]
    speed = _steady_speed(1000, step_ms)
    expected = {"steady_tokens_per_s": round(1000 / 0.55, 2), "outlier_steps": 1, "outlier_seconds": 3.3}
    assert speed == expected
    assert _steady_speed(0, [])["outlier_steps"] == 0


def test_ramp_loses_nothing_and_bf16_matches_the_reference():
    checkpoint = load_checkpoint(None, progress=False)
    adaptive_options = {"kv_policy": "adaptive", "control_interval_s": 0.0}
    settings = {"bf16": {}, "adaptive": adaptive_options, "adaptive again": dict(adaptive_options)}
    result = run_ramp(
        checkpoint, settings, num_requests=6, max_tokens=16, num_blocks=32, first_gap=2, last_gap=1
    )
    bf16, adaptive = result["rows"]["bf16"], result["rows"]["adaptive"]
    # the engine runs on the ramp's step clock: a setting run twice decides the same at the same steps
    again = result["rows"]["adaptive again"]
    assert result["seconds_per_step"] == 0.1
    assert again["switches"] == adaptive["switches"] and again["timeline"] == adaptive["timeline"]
    assert again["preemptions"] == adaptive["preemptions"] and again["agreement"] == adaptive["agreement"]
    assert bf16["lost"] == adaptive["lost"] == 0 and bf16["finished"] == adaptive["finished"] == 6
    assert bf16["generated_tokens"] == adaptive["generated_tokens"] == 6 * 16
    assert bf16["agreement"]["identical"] == 1.0 and bf16["divergences"] == []
    for divergence in adaptive["divergences"]:  # where each reply left the reference, and at what format
        assert 0 <= divergence["position"] < 16 and divergence["kv_format"] in ("bf16", "int8", "int4")
    assert len(adaptive["timeline"]["kv_format"]) == len(adaptive["step_ms"]) == adaptive["steps"]
    assert all(ms > 0 for ms in adaptive["step_ms"]) and adaptive["graph_captures"] == 0  # no graphs on CPU
    assert all(s["new"] in ("bf16", "int8", "int4") for s in adaptive["switches"])
    assert result["cache_tokens_bf16"] == 32 * 16 and bf16["peak_demand_vs_bf16_cache"] > 0


def test_ramp_settings_name_the_hot_window_rows():
    import argparse

    import pytest

    from adaptserve.bench.kv_cli import ramp_settings

    args = argparse.Namespace(
        ramp_settings="bf16,adaptive,adaptive-hot2",
        kv_ladder="bf16,int8",
        kv_error_budget=0.05,
        kv_hot_window=0,
    )
    settings = ramp_settings(args)
    assert list(settings) == ["bf16", "adaptive", "adaptive-hot2"] and settings["bf16"] == {}
    assert settings["adaptive"]["kv_hot_window"] == 0 and settings["adaptive"]["kv_ladder"] == (
        "bf16",
        "int8",
    )
    assert settings["adaptive-hot2"] == {**settings["adaptive"], "kv_hot_window": 2}
    for wrong in ("adaptive-hot", "adaptive-hotx", "int8"):
        with pytest.raises(SystemExit, match="--ramp-settings"):
            ramp_settings(argparse.Namespace(**{**vars(args), "ramp_settings": wrong}))
