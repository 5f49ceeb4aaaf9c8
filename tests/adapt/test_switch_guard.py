"""The shared anti-thrash helper: hysteresis band, confirmation, cooldown, rate limit."""

import math

import pytest

from adaptserve.adapt.switch_guard import Hysteresis, SwitchGuard


def test_hysteresis_ignores_a_signal_oscillating_inside_the_band():
    band = Hysteresis(low=0.4, high=0.6)
    states = [band.update(0.5 + 0.09 * math.sin(i)) for i in range(200)]
    assert not any(states)
    assert band.update(0.61) is True
    states = [band.update(0.5 + 0.09 * math.sin(i)) for i in range(200)]
    assert all(states)  # stays high until the signal goes below low
    assert band.update(0.39) is False


def test_hysteresis_refuses_an_inverted_band():
    with pytest.raises(ValueError, match="low"):
        Hysteresis(low=0.7, high=0.6)


def test_confirmation_needs_the_same_proposal_in_a_row():
    guard = SwitchGuard(cooldown_s=0, confirm=3, max_switches=100)
    assert not guard.allow(0.0, 8)
    assert not guard.allow(1.0, 16)  # a different value restarts the streak
    assert not guard.allow(2.0, 16)
    assert guard.allow(3.0, 16)


def test_cooldown_and_rate_limit_hold_switches_back():
    guard = SwitchGuard(cooldown_s=5.0, confirm=1, max_switches=2, window_s=60.0)
    assert guard.allow(0.0, "a")
    guard.switched(0.0)
    assert not guard.allow(4.9, "b")  # cooldown
    assert guard.allow(5.0, "b")
    guard.switched(5.0)
    assert not guard.allow(30.0, "c")  # two switches in the last 60 s
    assert guard.allow(60.5, "c")  # the first one left the window
    assert guard.num_blocked == 2


def test_a_signal_flipping_every_round_never_switches_with_confirmation():
    guard = SwitchGuard(cooldown_s=0, confirm=2)
    assert not any(guard.allow(float(i), i % 2) for i in range(100))
