"""The control plane: cadence, first-wins per knob, validation, log and listeners."""

import pytest

from adaptserve.adapt.control_plane import ControlPlane
from adaptserve.adapt.knobs import Decision, Knobs
from adaptserve.adapt.telemetry import Telemetry


class Fixed:
    def __init__(self, name, changes):
        self.name, self.changes, self.calls = name, changes, 0

    def decide(self, snapshot):
        self.calls += 1
        return Decision(self.changes, f"{self.name} wants it") if self.changes else None


def test_rounds_run_at_the_interval_and_the_first_controller_wins_a_knob():
    applied = []
    first = Fixed("first", {"max_num_seqs": 8})
    second = Fixed("second", {"max_num_seqs": 4, "batch_wait_s": 0.05})
    plane = ControlPlane(Knobs(), [first, second], Telemetry(), lambda k, v: applied.append((k, v)), 1.0)
    switches = plane.after_step(0.0)
    assert applied == [("max_num_seqs", 8), ("batch_wait_s", 0.05)]
    assert [(s.knob, s.controller) for s in switches] == [
        ("max_num_seqs", "first"),
        ("batch_wait_s", "second"),
    ]
    assert plane.knobs.max_num_seqs == 8
    assert plane.after_step(0.5) == [] and first.calls == 1  # not yet a second since the last round
    assert plane.after_step(1.0) == []  # same values: nothing to switch
    assert first.calls == 2
    assert plane.switches.counts == {("max_num_seqs", "first"): 1, ("batch_wait_s", "second"): 1}


def test_a_value_the_engine_refuses_is_not_recorded():
    def refuse(name, value):
        raise ValueError(f"knob {name}={value} exceeds the configured ceiling 64")

    plane = ControlPlane(Knobs(), [Fixed("greedy", {"max_num_seqs": 128})], Telemetry(), refuse)
    with pytest.raises(ValueError, match="ceiling"):
        plane.after_step(0.0)
    assert plane.knobs.max_num_seqs == 64 and not plane.switches.recent


def test_listeners_hear_every_switch():
    heard = []
    plane = ControlPlane(Knobs(), [], Telemetry(), lambda k, v: None)
    plane.listeners.append(heard.append)
    plane.set("prefill_chunk", 256, "admin", "by hand", now=3.0)
    assert [(s.knob, s.old, s.new, s.time) for s in heard] == [("prefill_chunk", 0, 256, 3.0)]
