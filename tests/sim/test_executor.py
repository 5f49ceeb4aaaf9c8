"""SimulatedExecutor: a step takes what the cost model predicts for its shape, and samples tokens."""

import math

import pytest

from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.engine.outputs import ScheduledSequence, SchedulerOutput
from adaptserve.engine.request import SamplingParams
from adaptserve.model.config import get_preset
from adaptserve.sim.clock import VirtualClock
from adaptserve.sim.executor import SimulatedExecutor

COST = StepCostModel(
    fixed_s=0.01,
    per_token_s=1e-4,
    per_sequence_s=1e-3,
    per_context_s=1e-6,
    precision_scale={"fp8": 0.5},
    kv_format_scale={"int8": 0.8},
)


def sequence(request_id: str, num_computed: int, num_new: int, sample: bool) -> ScheduledSequence:
    return ScheduledSequence(
        request_id, [7] * num_new, num_computed, [0], sample, SamplingParams(), [7] * num_computed, []
    )


def executor(**options) -> SimulatedExecutor:
    return SimulatedExecutor(COST, get_preset("tiny"), 64, VirtualClock(), **options)


def mixed_step() -> SchedulerOutput:
    # a 30-token prompt chunk (not its last) and two decodes with 10 and 50 tokens cached
    seqs = [sequence("a", 0, 30, False), sequence("b", 10, 1, True), sequence("c", 50, 1, True)]
    return SchedulerOutput(seqs, 32)


def test_a_step_takes_the_predicted_time_when_its_tokens_are_read():
    sim = executor()
    launched = sim.launch(mixed_step())
    assert sim.clock() == 0.0  # running: the engine stamps the launch now, as on a GPU
    output = launched.result()
    context = 30 + 11 + 51
    assert sim.clock() == pytest.approx(0.01 + 32e-4 + 3e-3 + context * 1e-6)
    assert sim.num_steps == 1 and sim.busy_time == pytest.approx(sim.clock())
    assert output.request_ids == ["b", "c"]  # only sequences that sample get a token
    assert all(t not in get_preset("tiny").eos_token_ids for t in output.sampled_token_ids)
    assert len(output.logprobs) == 2


def test_an_empty_step_takes_no_time():
    sim = executor()
    output = sim.launch(SchedulerOutput([], 0)).result()
    assert sim.clock() == 0.0 and sim.num_steps == 0 and output.request_ids == []


def test_precision_and_kv_format_scale_the_step():
    base = executor().step_seconds(mixed_step())
    sim = executor(precision="fp8", kv_format="int8")
    assert sim.step_seconds(mixed_step()) == pytest.approx(base * 0.5 * 0.8)
    sim.precision.policy, sim.kv_format = "native", "bf16"
    assert sim.step_seconds(mixed_step()) == pytest.approx(base)


def test_noise_is_seeded_and_keeps_the_mean():
    base = executor().step_seconds(mixed_step())
    times = [executor(noise=0.2, seed=3) for _ in range(2)]
    runs = [[sim.step_seconds(mixed_step()) for _ in range(2000)] for sim in times]
    assert runs[0] == runs[1]
    assert runs[0] != [executor(noise=0.2, seed=4).step_seconds(mixed_step()) for _ in range(2000)]
    mean = sum(runs[0]) / len(runs[0])
    spread = math.sqrt(sum((t / base - 1) ** 2 for t in runs[0]) / len(runs[0]))
    assert mean == pytest.approx(base, rel=0.02)
    assert spread == pytest.approx(0.2, rel=0.15)
