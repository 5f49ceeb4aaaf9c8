"""StepPrecision's observations reach the controller without waiting on the device: in step order,
once each copy has landed, with at most IN_FLIGHT waiting (runner/precision.py)."""

from __future__ import annotations

import pytest
import torch

from adaptserve.config import PrecisionConfig
from adaptserve.runner import precision as step_precision
from adaptserve.runner.precision import IN_FLIGHT, StepPrecision


class _Copy:
    """A stand-in for a CUDA event: lands when the test says so, or when waited on."""

    def __init__(self):
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def _adaptive(monkeypatch) -> tuple[StepPrecision, list[float]]:
    """An adaptive StepPrecision and the scores its controller has read, in order."""
    precision = StepPrecision(PrecisionConfig(precision_policy="adaptive"), ("fp8", "int4"))
    read = []
    decide = precision.controller.decide
    monkeypatch.setattr(
        precision.controller, "decide", lambda score, memory: read.append(score) or decide(score, memory)
    )
    return precision, read


def _logits(confident: bool) -> torch.Tensor:
    logits = torch.zeros(2, 50)  # [N, V]: uniform rows score about 0.01
    if confident:
        logits[:, 3] = 30.0  # one token takes all the mass: score 1
    return logits


def test_cpu_observations_reach_the_controller_at_once(monkeypatch):
    precision, read = _adaptive(monkeypatch)
    precision.observe(_logits(True), "bf16", None)
    assert len(read) == 1 and read[0] > 0.99 and precision.last_score == read[0]
    precision.observe(_logits(False), "bf16", _logits(False))  # a shadowed step: both rows agree
    assert len(read) == 2 and read[1] < 0.1
    assert precision.num_shadowed_tokens == 2 and precision.num_shadow_agreements == 2
    shadow = _logits(False)
    shadow[0, 7] = 1.0  # row 0's top-1 differs
    precision.observe(_logits(False), "bf16", shadow)
    assert precision.num_shadowed_tokens == 4 and precision.num_shadow_agreements == 3


def test_observations_wait_for_their_copy_and_keep_step_order(monkeypatch):
    precision, read = _adaptive(monkeypatch)
    copies = []

    def on_its_way(numbers):  # as if the numbers were copied from a GPU
        copies.append(_Copy())
        return numbers, copies[-1]

    monkeypatch.setattr(precision, "_to_host", on_its_way)
    precision.observe(_logits(True), "bf16", None)
    assert read == []  # not landed: the controller has not read it
    precision.observe(_logits(False), "bf16", None)
    copies[1].done = True  # the newer one lands first: it must still wait for the older one
    precision.choose(decode_only=True)
    assert read == []
    copies[0].done = True
    precision.choose(decode_only=True)  # a step's choice reads what has landed
    assert len(read) == 2 and read[0] > 0.99 and read[1] < 0.1  # both, oldest first
    for _ in range(IN_FLIGHT + 1):  # one more than may wait: the oldest is waited for
        precision.observe(_logits(True), "bf16", None)
    assert copies[2].waited and not any(c.waited for c in copies[3:])
    assert len(read) == 3 and len(precision._in_flight) == IN_FLIGHT
    precision.settle()
    assert len(read) == 2 + IN_FLIGHT + 1 and not precision._in_flight


def test_host_buffers_are_reused_in_turn(monkeypatch):
    made = []
    monkeypatch.setattr(step_precision.torch, "empty", lambda *a, **k: made.append(1) or torch.zeros(2))
    precision = StepPrecision(PrecisionConfig(precision_policy="adaptive"), ("fp8", "int4"))
    buffers = [precision._host_buffer() for _ in range(2 * (IN_FLIGHT + 1))]
    assert len(made) == IN_FLIGHT + 1
    assert all(a is b for a, b in zip(buffers[: IN_FLIGHT + 1], buffers[IN_FLIGHT + 1 :], strict=True))


@pytest.mark.cuda
def test_cuda_observations_land_through_pinned_buffers(monkeypatch):
    precision, read = _adaptive(monkeypatch)
    for step in range(3 * IN_FLIGHT):
        precision.observe(_logits(step % 2 == 0).cuda(), "bf16", _logits(True).cuda())
    precision.settle()
    assert len(read) == 3 * IN_FLIGHT and read[0] > 0.99 and read[1] < 0.1
    assert precision.num_shadowed_tokens == 6 * IN_FLIGHT and precision._host_buffers[0].is_pinned()
    assert precision.num_shadow_agreements == 3 * IN_FLIGHT  # the confident steps agree with the shadow
