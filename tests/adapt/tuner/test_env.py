"""ServingEnv on a tiny simulated trace: gymnasium's checker, an episode, and a reward that can tell."""

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")

from gymnasium.utils.env_checker import check_env  # noqa: E402

from adaptserve.adapt.step_cost import StepCostModel  # noqa: E402
from adaptserve.adapt.tuner.env import ServingEnv, TraceSpec  # noqa: E402
from adaptserve.adapt.tuner.reward import SLO  # noqa: E402
from adaptserve.adapt.tuner.space import ActionSpace  # noqa: E402
from adaptserve.bench.arrivals import GammaArrivals  # noqa: E402
from adaptserve.bench.workloads import RandomWorkload  # noqa: E402

GRIDS = {
    "max_num_seqs": (1, 32),
    "max_num_batched_tokens": (512,),
    "prefill_chunk": (0,),
    "batch_wait_s": (0.0,),
}


def make_env(num_requests: int = 40) -> ServingEnv:
    trace = TraceSpec(
        RandomWorkload(512, input_len=32, output_len=16, range_ratio=0.5), GammaArrivals(8.0), num_requests
    )
    cost = StepCostModel(fixed_s=0.01, per_token_s=1e-4)
    return ServingEnv(
        trace,
        cost,
        "tiny",
        ActionSpace.from_grids(GRIDS),
        SLO(ttft_s=0.5, tpot_s=0.05),
        window_s=1.0,
        max_windows=30,
    )


def episode(env: ServingEnv, action: int, seed: int) -> tuple[list[float], list[dict]]:
    env.reset(seed=seed)
    rewards, infos = [], []
    while True:
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs)
        rewards.append(reward)
        infos.append(info)
        if terminated or truncated:
            return rewards, infos


def test_gymnasium_env_checker_passes():
    check_env(make_env(), skip_render_check=True)


def test_an_episode_serves_the_whole_trace():
    env = make_env()
    rewards, infos = episode(env, 1, seed=0)
    assert infos[-1]["time"] == pytest.approx(len(rewards) * env.window_s)
    assert env.sim.done and len(rewards) < env.max_windows
    assert sum(i["num_finished"] for i in infos) == 40
    assert {"goodput", "attainment", "breach", "ttft_miss_share", "tpot_miss_share"} <= set(infos[0])


def test_reset_draws_the_same_trace_for_a_seed_and_another_for_another_seed():
    env = make_env()
    a, _ = env.reset(seed=3)
    first = [env.step(1)[1] for _ in range(3)]
    env.reset(seed=3)
    assert [env.step(1)[1] for _ in range(3)] == first
    _, info_a = env.reset(seed=3)
    _, info_b = env.reset(seed=4)
    assert info_a["trace_seed"] != info_b["trace_seed"]


def test_a_good_setting_earns_more_than_a_terrible_one():
    env = make_env()
    good, good_infos = episode(env, 1, seed=1)  # 32 sequences at once
    bad, bad_infos = episode(env, 0, seed=1)  # one sequence at a time: the queue grows past the TTFT SLO
    assert np.mean(good) > np.mean(bad) + 1.0
    assert np.mean([i["breach"] for i in bad_infos]) > np.mean([i["breach"] for i in good_infos])
    assert env.knobs().max_num_seqs == 1
