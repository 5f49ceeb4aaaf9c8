"""SimulatedExecutor: runs engine steps on a cost model instead of a model. No weights, no tensors.

Each step's time is predicted from its shape by a StepCostModel; the step "runs" from its launch until
`result()` is read, which moves the virtual clock to the step's end. Doing the wait in `result()`, as
a GPU does, makes the engine's own `execute_time` the predicted time (the engine stamps the launch
right after `launch()` returns)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.engine.outputs import RunnerOutput, SchedulerOutput
from adaptserve.model.config import ModelArchConfig
from adaptserve.sim.clock import VirtualClock


@dataclass(slots=True)
class SimDevice:
    type: str = "sim"  # the engine only asks for `.type` (never "cuda": nothing overlaps)


@dataclass(slots=True)
class SimPrecision:
    """The executor's weight precision (a `precision_policy` value) and the memory-pressure gauge the
    engine writes before each step."""

    policy: str = "native"
    memory_pressure: float = 0.0


@dataclass(slots=True)
class SimLaunched:
    """A simulated step in flight: its tokens are ready at `done_at` (virtual seconds)."""

    output: RunnerOutput
    clock: VirtualClock
    done_at: float

    def result(self) -> RunnerOutput:
        self.clock.advance_to(max(self.clock(), self.done_at))
        return self.output


class SimulatedExecutor:
    """The engine's Executor over a StepCostModel and a VirtualClock.

    `noise`: relative spread of step times (lognormal with mean 1, seeded), to mimic measurement spread;
    0 (the default) gives exactly the model's predictions."""

    def __init__(
        self,
        cost_model: StepCostModel,
        arch: ModelArchConfig,
        num_blocks: int,
        clock: VirtualClock,
        precision: str = "native",
        kv_format: str = "bf16",
        noise: float = 0.0,
        seed: int = 0,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.cost_model = cost_model
        self.arch = arch
        self.num_blocks = num_blocks
        self.clock = clock
        self.device = SimDevice()
        self.precision = SimPrecision(precision)
        self.kv_format = kv_format
        self.source = "simulated"
        self.noise = noise
        self._rng = np.random.default_rng(seed)
        # sampled tokens are never EOS, so requests end by max_tokens as the workloads ask
        self.token_id = next(t for t in range(arch.vocab_size) if t not in set(arch.eos_token_ids))
        self.num_steps = 0  # steps that computed tokens
        self.busy_time = 0.0  # their predicted seconds, summed

    def warm_up(self) -> None:
        """Nothing to capture or compile."""

    def step_seconds(self, scheduler_output: SchedulerOutput) -> float:
        """The predicted time of one step (with noise when set); 0 for an empty step."""
        if scheduler_output.is_empty:
            return 0.0
        sequences = scheduler_output.sequences
        seconds = self.cost_model.predict(
            scheduler_output.num_batched_tokens,
            len(sequences),
            sum(seq.num_computed_tokens + len(seq.token_ids) for seq in sequences),
            self.precision.policy,
            self.kv_format,
        )
        if self.noise:
            seconds *= math.exp(self.noise * self._rng.standard_normal() - self.noise**2 / 2)
        return max(0.0, seconds)

    def launch(self, scheduler_output: SchedulerOutput) -> SimLaunched:
        seconds = self.step_seconds(scheduler_output)
        if not scheduler_output.is_empty:
            self.num_steps += 1
            self.busy_time += seconds
        sampled = [seq.request_id for seq in scheduler_output.sequences if seq.sample]
        output = RunnerOutput(sampled, [self.token_id] * len(sampled), [None] * len(sampled))
        return SimLaunched(output, self.clock, self.clock() + seconds)
