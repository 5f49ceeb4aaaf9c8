"""`ServingEnv`: the tuner's problem as a gymnasium Env, run on the simulator, for offline RL.

An episode is one seeded trace (workload + arrival process, both drawn from the episode's seed) served
by the simulated engine. Each step puts one action (a KnobSetting of the action space) in force, runs one
decision window of simulated time, and returns
- observation: the context vector (space.context_features) of a Telemetry snapshot of replica 0,
  taken at the window's end over the window;
- reward: reward.score_window of the requests that finished in the window (goodput minus weighted
  SLO misses), the same reward the online bandit learns from;
- info: goodput, the miss shares, SLO attainment, and the guardrail breach flag with its reasons.
The episode terminates when every request of the trace has finished, and is truncated after
`max_windows` windows.

The simulator and the engine are imported when an Env is built, so this module imports without them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from adaptserve.adapt.knobs import Knobs
from adaptserve.adapt.snapshot import TelemetrySnapshot
from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.adapt.tuner.reward import SLO, Guardrail, RewardWeights, WindowScore, score_window
from adaptserve.adapt.tuner.space import CONTEXT_NAMES, ActionSpace, ContextScales, context_features
from adaptserve.bench.metrics import RequestOutcome


class Workload(Protocol):
    def requests(self, num: int, seed: int) -> list: ...


class Arrivals(Protocol):
    def times(self, num: int, seed: int) -> list[float]: ...


@dataclass(frozen=True)
class TraceSpec:
    """What each episode serves: `num_requests` from `workload`, arriving as `arrivals` draws them."""

    workload: Workload  # e.g. bench.workloads.ShareGPTShapedWorkload
    arrivals: Arrivals  # e.g. bench.arrivals.BurstyArrivals
    num_requests: int = 200


class ServingEnv(gym.Env):
    """One decision per window over `space`; see the module docstring.

    `arch` is a ModelArchConfig or a preset name (`smollm2-135m`, `llama-3.1-8b`, ...): only its shape
    is used, no weights are built. `engine_config` sets what the knobs do not (KV blocks, context);
    its max_num_seqs and max_num_batched_tokens are raised to the space's largest values, which the
    engine treats as ceilings. The episode starts with `start` in force (default: the space's first
    setting)."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        trace: TraceSpec,
        cost_model: StepCostModel,
        arch: Any = "smollm2-135m",
        space: ActionSpace | None = None,
        slo: SLO | None = None,
        window_s: float = 5.0,
        max_windows: int = 10_000,
        engine_config: Any = None,
        scales: ContextScales | None = None,
        weights: RewardWeights | None = None,
        guardrail: Guardrail | None = None,
        start: int = 0,
    ):
        if not window_s > 0 or max_windows < 1:
            raise ValueError(
                f"ServingEnv needs window_s > 0 and max_windows >= 1, got {window_s}, {max_windows}"
            )
        self.trace, self.cost_model = trace, cost_model
        self.arch = _arch(arch)
        self.space = space or ActionSpace.from_grids()
        if not 0 <= start < len(self.space):
            raise ValueError(f"start action {start} is not in the action space of {len(self.space)}")
        self.slo = slo or SLO()
        self.window_s, self.max_windows, self.start = window_s, max_windows, start
        self.scales = scales or ContextScales()
        self.weights = weights or RewardWeights()
        self.guardrail = guardrail or Guardrail()
        self.engine_config = self._engine_config(engine_config)
        self.action_space = gym.spaces.Discrete(len(self.space))
        self.observation_space = gym.spaces.Box(0.0, 1.0, (len(CONTEXT_NAMES),), np.float32)
        self.sim = None
        self.telemetry = None
        self.num_windows = 0
        self.last_snapshot: TelemetrySnapshot | None = None  # of the last window (or of the reset)
        self.last_outcomes: list[RequestOutcome] = []  # requests that finished in the last window
        self.last_score: WindowScore | None = None

    # ---- gymnasium -------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Draw a new trace from the Env's generator (seeded by `seed`) and start it with `start`."""
        super().reset(seed=seed)
        from adaptserve.adapt.telemetry import Telemetry
        from adaptserve.sim import Simulation

        trace_seed = int(self.np_random.integers(2**31))
        num = self.trace.num_requests
        requests = self.trace.workload.requests(num, trace_seed)
        times = self.trace.arrivals.times(num, trace_seed + 1)
        self.sim = Simulation(requests, times, self.cost_model, self.engine_config, self.arch)
        engine = self.sim.replicas[0].engine
        self.telemetry = Telemetry(window_s=self.window_s, scheduler=engine.scheduler)
        engine.stat_loggers.append(self.telemetry)
        self._apply(self.start)
        self.num_windows = 0
        self.last_outcomes, self.last_score = [], None
        self.last_snapshot = self.telemetry.snapshot(self.sim.now, engine.knobs)
        return self._observation(), {"trace_seed": trace_seed}

    def step(self, action):
        if self.sim is None:
            raise RuntimeError("call reset() before step()")
        action = int(action)
        if not self.action_space.contains(action):
            raise ValueError(f"action {action} is not in Discrete({len(self.space)})")
        self._apply(action)
        t0 = self.sim.now
        t1 = t0 + self.window_s
        self.sim.run_until(t1)
        self.num_windows += 1
        self.last_outcomes = [o.outcome for o in self.sim.outcomes_between(t0, t1)]
        self.last_snapshot = self.telemetry.snapshot(t1, self.sim.replicas[0].engine.knobs)
        score = score_window(
            self.last_outcomes, self.window_s, self.slo, self.last_snapshot, self.weights, self.guardrail
        )
        self.last_score = score
        info = {
            "time": t1,
            "action": action,
            "goodput": score.goodput,
            "attainment": score.attainment,
            "num_finished": score.num_finished,
            "num_good": score.num_good,
            "ttft_miss_share": score.ttft_miss_share,
            "tpot_miss_share": score.tpot_miss_share,
            "breach": score.breach,
            "slo_breach": score.slo_breach,
            "memory_breach": score.memory_breach,
            "reasons": score.reasons,
        }
        terminated = self.sim.done
        truncated = not terminated and self.num_windows >= self.max_windows
        return self._observation(), float(score.reward), terminated, truncated, info

    # ---- helpers ---------------------------------------------------------------------------------

    def knobs(self) -> Knobs:
        """The knobs in force on replica 0."""
        return self.sim.replicas[0].engine.knobs

    def _apply(self, action: int) -> None:
        knobs = self.sim.replicas[0].engine.knobs
        for name, value in self.space[action].values.items():
            if getattr(knobs, name) != value:
                self.sim.set_knob(name, value, f"env action {action}")

    def _observation(self) -> np.ndarray:
        return context_features(self.last_snapshot, self.slo, self.scales)

    def _engine_config(self, config):
        from adaptserve.config import EngineConfig

        config = copy.deepcopy(config) if config is not None else EngineConfig()
        config.scheduler.max_num_seqs = max(
            config.scheduler.max_num_seqs, self.space.max_value("max_num_seqs")
        )
        config.scheduler.max_num_batched_tokens = max(
            config.scheduler.max_num_batched_tokens, self.space.max_value("max_num_batched_tokens")
        )
        config.validate()
        return config


def _arch(arch: Any):
    if isinstance(arch, str):
        from adaptserve.model.config import get_preset

        return get_preset(arch)
    return arch
