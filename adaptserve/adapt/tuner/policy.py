"""`PolicyController`: a trained policy (obs -> action) serving as a control-plane Controller.

Signal: the context vector (space.context_features) of each snapshot. Knobs: all those of the action
space, set together. Thresholds: none of its own; the policy was trained on ServingEnv, whose reward
already charges SLO misses. Guardrail: none beyond the policy's training, which is why the safe bandit,
not this controller, is the one to run where exploration is allowed; a SwitchGuard keeps it from
switching more than once per `window_s` (the window it was trained on).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from adaptserve.adapt.knobs import Decision
from adaptserve.adapt.snapshot import TelemetrySnapshot
from adaptserve.adapt.switch_guard import SwitchGuard
from adaptserve.adapt.tuner.reward import SLO
from adaptserve.adapt.tuner.space import ActionSpace, ContextScales, context_features

Policy = Callable[[np.ndarray], int]
SB3_ALGORITHMS = ("PPO", "DQN", "A2C")


def load_policy(path: str | Path, algorithm: str = "PPO") -> Policy:
    """A stable-baselines3 model zip as a deterministic obs -> action function (SB3 imported here)."""
    if algorithm not in SB3_ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(SB3_ALGORITHMS)}")
    import stable_baselines3

    model = getattr(stable_baselines3, algorithm).load(str(path), device="cpu")

    def act(obs: np.ndarray) -> int:
        action, _ = model.predict(obs, deterministic=True)
        return int(action)

    return act


class PolicyController:
    """Acts as a trained policy says, at most once per window; see the module docstring."""

    name = "policy"

    def __init__(
        self,
        policy: Policy | str | Path,
        space: ActionSpace,
        slo: SLO,
        scales: ContextScales | None = None,
        window_s: float = 5.0,
        algorithm: str = "PPO",
    ):
        self.policy = load_policy(policy, algorithm) if isinstance(policy, (str, Path)) else policy
        self.space, self.slo = space, slo
        self.scales = scales or ContextScales()
        self.guard = SwitchGuard(cooldown_s=window_s, confirm=1, max_switches=10**9)
        self.num_decisions = 0
        self._last_decision = float("-inf")  # engine clock of the last decide()

    def action(self, snapshot: TelemetrySnapshot) -> int:
        """The policy's action for this snapshot, checked against the space."""
        action = int(self.policy(context_features(snapshot, self.slo, self.scales)))
        if not 0 <= action < len(self.space):
            raise ValueError(f"the policy chose action {action}; the space has {len(self.space)}")
        return action

    def decide(self, snapshot: TelemetrySnapshot) -> Decision | None:
        if snapshot.time < self._last_decision:  # a new clock (a restarted engine, the next trace)
            self.guard = SwitchGuard(cooldown_s=self.guard.cooldown_s, confirm=1, max_switches=10**9)
        self._last_decision = snapshot.time
        action = self.action(snapshot)
        setting = self.space[action]
        if setting.matches(snapshot.knobs):
            self.guard.reset()
            return None
        if not self.guard.allow(snapshot.time, action):
            return None
        self.guard.switched(snapshot.time)
        self.num_decisions += 1
        return Decision(setting.changes(), f"policy: action {action} ({setting.label()})", self.name)
