"""VirtualClock: the engine's clock in the simulator; it only moves forward."""

import pytest

from adaptserve.sim.clock import VirtualClock


def test_the_clock_reads_what_it_was_moved_to():
    clock = VirtualClock()
    assert clock() == 0.0
    clock.advance(0.25)
    clock.advance_to(1.5)
    clock.advance(0.5)
    assert clock() == clock.now == 2.0
    clock.advance_to(2.0)  # standing still is allowed
    assert clock() == 2.0


def test_the_clock_never_goes_back():
    clock = VirtualClock(start=3.0)
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(2.9)
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-0.1)
    assert clock() == 3.0
