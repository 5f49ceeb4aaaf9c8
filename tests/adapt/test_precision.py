"""PrecisionController on synthetic confidence streams: patience, cooldown, hysteresis, guardrails."""

import random

import pytest

from adaptserve.adapt.precision import PrecisionController, PrecisionDecision, PrecisionPolicyConfig
from adaptserve.adapt.quality import QualityMonitor
from adaptserve.config import ConfigError


def run(controller: PrecisionController, scores, memory_pressure: float = 0.0) -> list:
    return [controller.decide(score, memory_pressure) for score in scores]


def step_down_to_int4(controller: PrecisionController) -> None:
    for _ in range(100):
        controller.decide(0.99)
        if controller.precision == "int4":
            return
    raise AssertionError("never reached int4")


def test_steady_confidence_steps_down_with_patience_and_cooldown():
    controller = PrecisionController(PrecisionPolicyConfig(patience_steps=4, cooldown_steps=8))
    decisions = run(controller, [0.99] * 30)
    # steps 0-3 are four confident steps -> fp8 at step 3; the int4 count reaches 4 at step 7 but the
    # cooldown holds it until step 3 + 8 = 11, by when 8 confident steps have been seen
    assert list(controller.history) == [(3, "fp8", "confident 4 steps"), (11, "int4", "confident 8 steps")]
    assert decisions[3] == PrecisionDecision("fp8", "confident 4 steps")
    assert decisions[11] == PrecisionDecision("int4", "confident 8 steps")
    assert sum(d is not None for d in decisions) == 2
    assert controller.num_switches == 2


def test_patience_alone_sets_the_pace_without_cooldown():
    controller = PrecisionController(PrecisionPolicyConfig(patience_steps=4, cooldown_steps=0))
    run(controller, [0.99] * 10)
    assert [step for step, _, _ in controller.history] == [3, 7]


def test_a_break_in_confidence_restarts_patience():
    controller = PrecisionController(PrecisionPolicyConfig(patience_steps=4))
    run(controller, [0.99, 0.99, 0.99, 0.5, 0.99, 0.99, 0.99, 0.99])
    assert list(controller.history) == [(7, "fp8", "confident 4 steps")]


def test_a_score_between_thresholds_stops_at_fp8():
    controller = PrecisionController()
    run(controller, [0.9] * 100)  # >= 0.85 (fp8) but < 0.95 (int4), and >= 0.80 (fp8's stay condition)
    assert controller.precision == "fp8"
    assert controller.num_switches == 1


def test_noisy_score_around_a_threshold_does_not_thrash():
    rng = random.Random(0)
    scores = [0.85 + rng.uniform(-0.03, 0.03) for _ in range(1000)]
    controller = PrecisionController()
    run(controller, scores)
    assert controller.num_switches <= 3
    assert controller.precision == "fp8"
    # the naive rule "fp8 when score >= 0.85, else bf16" switches on every crossing
    naive = ["fp8" if score >= 0.85 else "bf16" for score in scores]
    num_naive_switches = sum(a != b for a, b in zip(naive[:-1], naive[1:], strict=True))
    assert num_naive_switches > 300
    # without the up_margin the controller itself thrashes too, held back only by patience and cooldown
    no_margin = PrecisionController(PrecisionPolicyConfig(up_margin=0.0))
    run(no_margin, scores)
    assert no_margin.num_switches > 20 * controller.num_switches


def test_sudden_low_score_steps_up_at_once():
    controller = PrecisionController(PrecisionPolicyConfig(cooldown_steps=8))
    step_down_to_int4(controller)
    # the switch to int4 just happened, yet an uncertain step goes up without waiting for the cooldown
    assert controller.decide(0.3) == PrecisionDecision("bf16", "uncertain 0.30")
    assert controller.precision == "bf16"


def test_mild_dip_steps_up_only_as_far_as_needed():
    controller = PrecisionController(PrecisionPolicyConfig(cooldown_steps=0))
    step_down_to_int4(controller)
    assert controller.decide(0.92) is None  # int4 holds while score >= 0.95 - 0.05
    assert controller.decide(0.87) == PrecisionDecision("fp8", "uncertain 0.87")
    assert controller.decide(0.82) is None  # fp8 holds while score >= 0.85 - 0.05


def test_nan_score_counts_as_uncertain():
    controller = PrecisionController(PrecisionPolicyConfig(cooldown_steps=0))
    step_down_to_int4(controller)
    assert controller.decide(float("nan")) == PrecisionDecision("bf16", "uncertain 0.00")


def test_memory_pressure_forces_int4_and_holds_until_low():
    controller = PrecisionController()
    assert controller.decide(0.1, memory_pressure=0.97) == PrecisionDecision("int4", "memory pressure 0.97")
    # low confidence would step up, but the override holds while pressure stays above memory_low
    for pressure in (0.97, 0.94, 0.9, 0.86):
        assert controller.decide(0.1, memory_pressure=pressure) is None
        assert controller.precision == "int4"
    # at <= 0.85 the override releases and the normal rules resume on the same step
    assert controller.decide(0.1, memory_pressure=0.85) == PrecisionDecision("bf16", "uncertain 0.10")
    # once released, only memory_high forces it again
    assert controller.decide(0.1, memory_pressure=0.94) is None
    assert controller.decide(0.1, memory_pressure=0.95) == PrecisionDecision("int4", "memory pressure 0.95")


def test_confident_stream_stays_low_after_memory_release():
    controller = PrecisionController()
    controller.decide(0.99, memory_pressure=0.99)
    assert controller.decide(0.99, memory_pressure=0.5) is None
    assert controller.precision == "int4"


def test_quality_breach_forces_bf16_and_blocks_stepping_down_until_recovery():
    monitor = QualityMonitor(budget=0.99, window=100, min_samples=10)
    controller = PrecisionController(PrecisionPolicyConfig(cooldown_steps=0), quality=monitor)
    step_down_to_int4(controller)
    monitor.record(5, 10)  # a shadowed step where half the tokens disagree
    assert controller.decide(0.99) == PrecisionDecision("bf16", "quality budget")
    assert controller.patience == 8  # the breach doubled the patience
    # confident steps cannot step down while agreement is below budget; probes keep the window moving
    for _ in range(9):
        assert controller.decide(0.99) is None
        monitor.record(10, 10)
    assert not monitor.within_budget  # 95 / 100: the breach step is still in the window
    assert controller.decide(0.99) is None
    monitor.record(10, 10)  # the breach step slides out
    assert monitor.within_budget
    decisions = run(controller, [0.99] * 8)
    assert decisions[:7] == [None] * 7  # doubled patience: 8 confident steps, not 4
    assert decisions[7] == PrecisionDecision("fp8", "confident 8 steps")


def test_quality_backoff_grows_per_breach_and_decays_after_a_clean_window():
    monitor = QualityMonitor(budget=0.9, window=10, min_samples=10)
    config = PrecisionPolicyConfig(patience_steps=4, max_backoff=4, backoff_decay_steps=20)
    controller = PrecisionController(config, quality=monitor)
    for _ in range(3):  # three breaches, each followed by recovery
        monitor.record(0, 10)
        controller.decide(0.5)
        monitor.record(10, 10)
    assert controller.patience == 16  # 4 * min(2 ** 3, max_backoff 4)
    run(controller, [0.5] * 19)
    assert controller.patience == 16
    controller.decide(0.5)  # the 20th in-budget step halves the backoff
    assert controller.patience == 8
    run(controller, [0.5] * 20)
    assert controller.patience == 4
    run(controller, [0.5] * 100)
    assert controller.patience == 4  # never below patience_steps


def test_unavailable_precisions_are_skipped():
    config = PrecisionPolicyConfig(available=("bf16", "int4"), cooldown_steps=0)
    controller = PrecisionController(config)
    run(controller, [0.9] * 50)  # confident enough for fp8, which is not available; not for int4
    assert controller.precision == "bf16"
    run(controller, [0.99] * 4)
    assert list(controller.history) == [(53, "int4", "confident 4 steps")]
    assert controller.decide(0.85) == PrecisionDecision("bf16", "uncertain 0.85")
    assert controller.decide(0.1, memory_pressure=0.99).precision == "int4"
    assert {precision for _, precision, _ in controller.history} == {"bf16", "int4"}


def test_a_single_precision_never_switches():
    controller = PrecisionController(PrecisionPolicyConfig(available=("fp8",), down_thresholds={}))
    run(controller, [0.99, 0.1, 0.99], memory_pressure=0.99)
    assert (controller.precision, controller.num_switches) == ("fp8", 0)


def test_history_is_bounded():
    controller = PrecisionController(PrecisionPolicyConfig(cooldown_steps=0, history_size=3))
    for _ in range(10):
        step_down_to_int4(controller)
        controller.decide(0.1)
    assert controller.num_switches == 30
    assert len(controller.history) == 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"available": ()}, "precision.available"),
        ({"available": ("bf16", "fp4")}, "precision.available"),
        ({"available": ("fp8", "bf16")}, "precision.available"),
        ({"available": ("bf16", "bf16")}, "precision.available"),
        ({"down_thresholds": {"fp8": 0.85}}, "precision.down_thresholds"),
        ({"down_thresholds": {"fp8": 0.85, "int4": 1.5}}, r"precision.down_thresholds\['int4'\]"),
        ({"down_thresholds": {"fp8": 0.9, "int4": 0.8}}, r"precision.down_thresholds\['int4'\]"),
        ({"down_thresholds": {"fp8": 0.85, "int4": 0.95, "fp4": 0.99}}, "precision.down_thresholds"),
        ({"up_margin": -0.1}, "precision.up_margin"),
        ({"patience_steps": 0}, "precision.patience_steps"),
        ({"cooldown_steps": -1}, "precision.cooldown_steps"),
        ({"memory_low": 0.96}, "precision.memory_low"),
        ({"max_backoff": 0}, "precision.max_backoff"),
        ({"backoff_decay_steps": 0}, "precision.backoff_decay_steps"),
        ({"history_size": 0}, "precision.history_size"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PrecisionPolicyConfig(**kwargs)


def test_unknown_config_keys_are_an_error():
    with pytest.raises(TypeError, match="patience"):
        PrecisionPolicyConfig(patience=4)
