"""QualityMonitor: agreement over a token window, the min-samples grace, breaches, seeded shadowing."""

import pytest

from adaptserve.adapt.quality import QualityMonitor
from adaptserve.config import ConfigError


def test_agreement_is_the_share_of_agreeing_tokens():
    monitor = QualityMonitor(budget=0.99, window=100, min_samples=1)
    monitor.record(9, 10)
    monitor.record(10, 10)
    assert monitor.num_samples == 20
    assert monitor.agreement == pytest.approx(19 / 20)
    assert not monitor.within_budget
    assert QualityMonitor(budget=0.9, window=100, min_samples=1).within_budget
    lenient = QualityMonitor(budget=0.95, window=100, min_samples=1)
    lenient.record(19, 20)
    assert lenient.within_budget  # 0.95 >= budget 0.95: the budget itself is in


def test_agreement_reads_one_until_min_samples():
    monitor = QualityMonitor(budget=0.99, window=256, min_samples=32)
    monitor.record(0, 31)
    assert monitor.agreement == 1.0
    assert monitor.within_budget
    assert monitor.num_breaches == 0
    monitor.record(1, 1)  # the 32nd token: 1 of 32 agree
    assert monitor.agreement == pytest.approx(1 / 32)
    assert monitor.num_breaches == 1


def test_window_slides_over_tokens():
    monitor = QualityMonitor(budget=0.9, window=10, min_samples=1)
    monitor.record(0, 5)
    assert monitor.agreement == 0.0
    monitor.record(10, 10)  # pushes all five disagreements out
    assert monitor.agreement == 1.0
    assert monitor.num_samples == 10


def test_window_cut_drops_a_steps_agreements_first():
    monitor = QualityMonitor(budget=0.9, window=10, min_samples=1)
    monitor.record(5, 10)  # window: 5 agree, then 5 disagree (the disagreements count as newest)
    monitor.record(3, 3)  # drops 3 agreements: 2 agree, 5 disagree, 3 agree
    assert monitor.agreement == pytest.approx(5 / 10)
    monitor.record(5, 5)  # drops 2 agreements and 3 disagreements: 2 disagree, 8 agree
    assert monitor.agreement == pytest.approx(8 / 10)


def test_a_breach_counts_once_until_the_monitor_recovers():
    monitor = QualityMonitor(budget=0.9, window=10, min_samples=10)
    monitor.record(10, 10)
    monitor.record(5, 5)
    assert monitor.num_breaches == 0
    monitor.record(0, 2)  # 8 / 10
    monitor.record(0, 1)  # 7 / 10: still the same breach
    assert (monitor.within_budget, monitor.num_breaches) == (False, 1)
    monitor.record(10, 10)
    assert monitor.within_budget
    monitor.record(0, 2)
    assert monitor.num_breaches == 2


def test_should_shadow_rate_is_close_to_shadow_rate():
    monitor = QualityMonitor(shadow_rate=0.1, seed=0)
    num_shadowed = sum(monitor.should_shadow() for _ in range(10_000))
    assert 900 <= num_shadowed <= 1100  # 10% of 10k, +-3.3 standard deviations (sigma = 30)
    assert not any(QualityMonitor(shadow_rate=0.0).should_shadow() for _ in range(1000))
    assert all(QualityMonitor(shadow_rate=1.0).should_shadow() for _ in range(1000))


def test_should_shadow_is_deterministic_by_seed():
    def draws(seed):
        monitor = QualityMonitor(shadow_rate=0.3, seed=seed)
        return [monitor.should_shadow() for _ in range(200)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"budget": 0.0}, "quality.budget"),
        ({"budget": 1.5}, "quality.budget"),
        ({"window": 0}, "quality.window"),
        ({"shadow_rate": -0.1}, "quality.shadow_rate"),
        ({"shadow_rate": 1.1}, "quality.shadow_rate"),
        ({"min_samples": 0}, "quality.min_samples"),
        ({"window": 16, "min_samples": 32}, "quality.min_samples"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        QualityMonitor(**kwargs)


@pytest.mark.parametrize("num_agree, num_total", [(3, 2), (-1, 2), (0, -1)])
def test_record_rejects_impossible_counts(num_agree, num_total):
    with pytest.raises(ValueError, match="num_agree"):
        QualityMonitor().record(num_agree, num_total)
