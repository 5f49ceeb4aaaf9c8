"""PolicyController: a plain callable and a saved stable-baselines3 model drive the knobs."""

import numpy as np
import pytest

from adaptserve.adapt.knobs import Knobs
from adaptserve.adapt.snapshot import TelemetrySnapshot
from adaptserve.adapt.tuner.policy import PolicyController
from adaptserve.adapt.tuner.reward import SLO
from adaptserve.adapt.tuner.space import CONTEXT_NAMES, ActionSpace

GRIDS = {
    "max_num_seqs": (16, 64),
    "max_num_batched_tokens": (2048,),
    "prefill_chunk": (0,),
    "batch_wait_s": (0.0,),
}


def snapshot(time: float, rate: float, knobs: Knobs) -> TelemetrySnapshot:
    return TelemetrySnapshot(time=time, window_s=5.0, knobs=knobs, arrival_rate=rate)


def by_load(obs: np.ndarray) -> int:
    return int(obs[0] > 0.5)  # busy (more than 4 req/s) -> the larger batch


def test_callable_policy_sets_the_knobs_once_per_window():
    space = ActionSpace.from_grids(GRIDS)
    controller = PolicyController(by_load, space, SLO(), window_s=5.0)
    knobs = Knobs(max_num_seqs=16)
    assert controller.decide(snapshot(0.0, 1.0, knobs)) is None  # already in force
    decision = controller.decide(snapshot(1.0, 20.0, knobs))
    assert decision is not None and decision.changes["max_num_seqs"] == 64
    assert decision.controller == "policy" and "action 1" in decision.reason
    knobs = knobs.replace(**decision.changes)
    assert controller.decide(snapshot(2.0, 1.0, knobs)) is None  # cooldown: one switch per window
    decision = controller.decide(snapshot(6.5, 1.0, knobs))
    assert decision is not None and decision.changes["max_num_seqs"] == 16


def test_an_action_outside_the_space_is_an_error():
    controller = PolicyController(lambda obs: 7, ActionSpace.from_grids(GRIDS), SLO())
    with pytest.raises(ValueError, match="action 7"):
        controller.decide(snapshot(0.0, 1.0, Knobs()))


def test_saved_sb3_model_loads_and_acts(tmp_path):
    sb3 = pytest.importorskip("stable_baselines3")
    gym = pytest.importorskip("gymnasium")

    class Bandit(gym.Env):
        """Two actions, one step: a model trained on nothing still has to load and act in range."""

        observation_space = gym.spaces.Box(0.0, 1.0, (len(CONTEXT_NAMES),), np.float32)
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), float(action), True, False, {}

    model = sb3.PPO("MlpPolicy", Bandit(), n_steps=32, batch_size=32, seed=0, device="cpu")
    model.learn(total_timesteps=64)
    path = tmp_path / "policy.zip"
    model.save(path)
    space = ActionSpace.from_grids(GRIDS)
    controller = PolicyController(path, space, SLO(), algorithm="PPO")
    action = controller.action(snapshot(0.0, 20.0, Knobs()))
    assert action in (0, 1)
    expected, _ = model.predict(np.zeros(len(CONTEXT_NAMES), np.float32), deterministic=True)
    assert controller.policy(np.zeros(len(CONTEXT_NAMES), np.float32)) == int(expected)


def test_a_new_clock_does_not_leave_the_cooldown_stuck():
    controller = PolicyController(by_load, ActionSpace.from_grids(GRIDS), SLO(), window_s=5.0)
    assert controller.decide(snapshot(100.0, 20.0, Knobs(max_num_seqs=16))) is not None
    # the next trace starts at 0 with the knobs back at 16: the switch is not held until t = 105
    assert controller.decide(snapshot(0.0, 20.0, Knobs(max_num_seqs=16))) is not None
