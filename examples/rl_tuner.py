"""Train a knob-tuning policy on the simulator, then compare it with the safe bandit and the best static
setting on held-out bursty and diurnal traces.

    python examples/rl_tuner.py                      # a few minutes on a CPU
    python examples/rl_tuner.py --timesteps 300      # a quick end-to-end check

All three pick among the same settings (max_num_seqs x token budget x prefill chunk) once per 5-second
decision window, on the same simulated engine: SmolLM2-135M shapes on a hand-set cost model of a small
device (or a fitted profile with --profile), a KV cache of 640 blocks, SLOs of TTFT 2 s and TPOT 80 ms.
- the RL policy: stable-baselines3 DQN (or PPO) trained on ServingEnv over bursty and diurnal traces;
- the safe bandit: SafeBanditTuner with the step-cost prior, warmed up online on the tuning traces and
  still learning on the held-out ones;
- the best static setting: every setting run on the tuning traces, the one with the best mean reward.
Prints a table (goodput, SLO attainment, share of windows that broke the guardrail) and writes
rl-tuner-sim.json and rl-tuner-sim.png to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptserve.adapt.knobs import Knobs
from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.adapt.tuner.bandit import BanditConfig, SafeBanditTuner
from adaptserve.adapt.tuner.env import ServingEnv, TraceSpec
from adaptserve.adapt.tuner.policy import PolicyController
from adaptserve.adapt.tuner.reward import SLO
from adaptserve.adapt.tuner.space import ActionSpace, ContextScales
from adaptserve.bench.arrivals import BurstyArrivals, DiurnalArrivals
from adaptserve.bench.workloads import ShareGPTShapedWorkload
from adaptserve.config import EngineConfig
from adaptserve.model.config import get_preset

ARCH = "smollm2-135m"
# a small device: 20 ms per step, 2.5k prompt tokens/s, decode of 64 sequences ~ 60 ms a step
SMALL_DEVICE = StepCostModel(
    fixed_s=0.02, per_token_s=4e-4, per_sequence_s=1e-4, per_context_s=2e-7, device="hand-set"
)
SLO_ = SLO(ttft_s=2.0, tpot_s=0.08)
GRIDS = {
    "max_num_seqs": (8, 16, 32, 64, 128),
    "max_num_batched_tokens": (256, 1024),
    "prefill_chunk": (0, 128),
    "batch_wait_s": (0.0,),
}
START = Knobs(max_num_seqs=32, max_num_batched_tokens=1024, prefill_chunk=0)
SCALES = ContextScales(arrival_rate=3.0)  # load buckets: < 1.5, 1.5-6, > 6 requests/s
WINDOW_S = 5.0
TRACES = {
    "bursty": BurstyArrivals(on_rate=4.5, off_rate=1.0, on_s=30.0, off_s=30.0),
    "diurnal": DiurnalArrivals(mean_rate=3.0, amplitude=0.6, period_s=120.0),
}
TUNE_SEEDS = (100, 101)  # the static grid search and the bandit's warm-up
EVAL_SEEDS = (1000, 1001)  # held out: nobody tunes on them


@dataclass(frozen=True)
class MixedArrivals:
    """Bursty or diurnal, by the seed's parity: the training distribution covers both."""

    def times(self, num: int, seed: int) -> list[float]:
        process = TRACES["bursty"] if seed % 2 == 0 else TRACES["diurnal"]
        return process.times(num, seed)


def make_env(arrivals, num_requests: int, cost: StepCostModel) -> ServingEnv:
    config = EngineConfig()
    config.model.max_model_len = 2048
    config.cache.num_blocks = 640  # 10k KV tokens: many long sequences at once run out of blocks
    workload = ShareGPTShapedWorkload(get_preset(ARCH).vocab_size, mean_output_len=96, max_len=512)
    space = ActionSpace.from_grids(GRIDS)
    return ServingEnv(
        TraceSpec(workload, arrivals, num_requests),
        cost,
        ARCH,
        space,
        SLO_,
        window_s=WINDOW_S,
        engine_config=config,
        scales=SCALES,
        start=space.index_of(START),  # every episode, and so the bandit, starts from a middling setting
    )


# ---- running a controller over one trace ---------------------------------------------------------


def run_trace(env: ServingEnv, seed: int, choose) -> dict:
    """One episode; `choose(env)` gives each window's action. Totals over the whole trace."""
    env.reset(seed=seed)
    windows = []
    while True:
        _, reward, terminated, truncated, info = env.step(choose(env))
        windows.append({**info, "reward": reward, "reasons": list(info["reasons"])})
        if terminated or truncated:
            break
    if hasattr(choose, "end"):
        choose.end(env)
    num_good = sum(w["num_good"] for w in windows)
    num_finished = sum(w["num_finished"] for w in windows)
    duration = len(windows) * env.window_s
    return {
        "goodput": num_good / duration,
        "attainment": num_good / max(1, num_finished),
        "breach_share": float(np.mean([w["breach"] for w in windows])),
        "mean_reward": float(np.mean([w["reward"] for w in windows])),
        "num_windows": len(windows),
        "actions": [w["action"] for w in windows],
    }


def static(action: int):
    return lambda env: action


class Controlled:
    """A control-plane Controller deciding each window from the env's last snapshot; one that learns
    (the bandit) also observes each window's finished requests, the trace's last one included."""

    def __init__(self, controller):
        self.controller = controller

    def __call__(self, env: ServingEnv) -> int:
        if env.num_windows:
            self.end(env)
        decision = self.controller.decide(env.last_snapshot)
        knobs = env.knobs().replace(**decision.changes) if decision else env.knobs()
        return env.space.index_of(knobs)

    def end(self, env: ServingEnv) -> None:
        if hasattr(self.controller, "observe"):
            self.controller.observe(env.last_outcomes, env.last_snapshot)


# ---- the three contenders --------------------------------------------------------------------------


def grid_search(env: ServingEnv) -> tuple[int, list[float]]:
    scores = []
    for action in range(len(env.space)):
        runs = [run_trace(env, seed, static(action)) for seed in TUNE_SEEDS]
        scores.append(float(np.mean([r["mean_reward"] for r in runs])))
        print(f"  static {action:2d} {env.space[action].label():38s} mean reward {scores[-1]:6.2f}")
    return int(np.argmax(scores)), scores


def train(env: ServingEnv, algorithm: str, timesteps: int, seed: int):
    import stable_baselines3 as sb3

    if algorithm == "dqn":
        model = sb3.DQN(
            "MlpPolicy",
            env,
            learning_starts=min(200, timesteps // 4),
            exploration_fraction=0.4,
            target_update_interval=200,
            train_freq=1,
            gamma=0.9,  # a window's setting mostly pays off in the next few windows
            seed=seed,
            device="cpu",
        )
    else:
        model = sb3.PPO("MlpPolicy", env, n_steps=256, batch_size=64, gamma=0.9, seed=seed, device="cpu")
    model.learn(total_timesteps=timesteps, progress_bar=True)
    return model


def make_bandit(env: ServingEnv, cost: StepCostModel, seed: int) -> SafeBanditTuner:
    return SafeBanditTuner(
        env.space, SLO_, BanditConfig(window_s=WINDOW_S, seed=seed), cost_model=cost, scales=SCALES
    )


# ---- output ------------------------------------------------------------------------------------------


def print_table(results: dict) -> None:
    print(
        f"\n{'trace':10s} {'method':10s} {'goodput req/s':>14s} {'SLO attainment':>15s} {'breach share':>13s}"
    )
    for trace, methods in results.items():
        for method, r in methods.items():
            print(
                f"{trace:10s} {method:10s} {r['goodput']:14.2f} {r['attainment']:15.1%} "
                f"{r['breach_share']:13.1%}"
            )


def plot(results: dict, path: Path, title: str) -> None:
    from adaptserve.bench.plot_parts import figure, grouped_bars

    fig, axes = figure([["goodput", "attainment", "breach"]], (14, 4.5), title)
    traces = list(results)
    for key, name, fmt in (
        ("goodput", "goodput (req/s)", lambda h: f"{h:.2f}"),
        ("attainment", "SLO attainment", lambda h: f"{h:.0%}"),
        ("breach", "windows breaking the guardrail", lambda h: f"{h:.0%}"),
    ):
        metric = {"goodput": "goodput", "attainment": "attainment", "breach": "breach_share"}[key]
        values = [{m: r[metric] for m, r in results[t].items()} for t in traces]
        grouped_bars(axes[key], traces, values, fmt=fmt)
        axes[key].set_title(name, fontsize=10)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--timesteps", type=int, default=3000, help="RL training windows (default 3000)")
    parser.add_argument("--algorithm", choices=("dqn", "ppo"), default="dqn")
    parser.add_argument("--num-requests", type=int, default=400, help="requests per trace (default 400)")
    parser.add_argument(
        "--warmup-traces", type=int, default=6, help="tuning traces the bandit learns on first"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="a StepCostModel JSON instead of the hand-set one"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="JSON and plot go here")
    parser.add_argument(
        "--model-dir", type=Path, default=Path("out"), help="the trained policy's zip goes here"
    )
    args = parser.parse_args()
    cost = StepCostModel.load(args.profile) if args.profile else SMALL_DEVICE
    start = time.perf_counter()

    print(f"training {args.algorithm.upper()} for {args.timesteps} windows on bursty + diurnal traces")
    train_env = make_env(MixedArrivals(), args.num_requests, cost)
    model = train(train_env, args.algorithm, args.timesteps, args.seed)
    model_path = args.model_dir / f"rl-tuner-{args.algorithm}.zip"
    args.model_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(model_path)
    policy = PolicyController(
        model_path, train_env.space, SLO_, SCALES, WINDOW_S, algorithm=args.algorithm.upper()
    )

    print("grid search of static settings on the tuning traces")
    best_action, static_scores = grid_search(make_env(MixedArrivals(), args.num_requests, cost))
    print(f"  best static setting: {train_env.space[best_action].label()}")

    bandit = make_bandit(train_env, cost, args.seed)
    warmup_env = make_env(MixedArrivals(), args.num_requests, cost)
    for i in range(args.warmup_traces):
        run_trace(warmup_env, TUNE_SEEDS[0] + 10 + i, Controlled(bandit))
    print(f"bandit warm-up: {bandit.num_windows} windows, {bandit.num_breaches} broke the guardrail")

    results: dict[str, dict[str, dict]] = {}
    for name, arrivals in TRACES.items():
        env = make_env(arrivals, args.num_requests, cost)
        results[name] = {}
        for method, choose in (
            ("static", static(best_action)),
            ("bandit", Controlled(bandit)),
            ("rl", Controlled(policy)),
        ):
            runs = [run_trace(env, seed, choose) for seed in EVAL_SEEDS]
            results[name][method] = {
                key: float(np.mean([r[key] for r in runs]))
                for key in ("goodput", "attainment", "breach_share", "mean_reward")
            }
            results[name][method]["actions"] = [r["actions"] for r in runs]

    print_table(results)
    explore_share = bandit.exploration_breaches / max(1, bandit.num_windows)
    print(
        f"\nbandit: {bandit.num_windows} windows, {bandit.num_explorations} explored, "
        f"{bandit.exploration_breaches} exploration breaches ({explore_share:.2%} of windows; goal < 2 %)"
    )
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s")

    data = {
        "benchmark": "rl_tuner",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"simulator, {ARCH} shapes, cost model {cost.device}",
        "cost_model": {
            k: getattr(cost, k) for k in ("fixed_s", "per_token_s", "per_sequence_s", "per_context_s")
        },
        "slo": {"ttft_s": SLO_.ttft_s, "tpot_s": SLO_.tpot_s},
        "window_s": WINDOW_S,
        "space": [s.label() for s in train_env.space],
        "traces": {name: process.describe() for name, process in TRACES.items()},
        "num_requests": args.num_requests,
        "tune_seeds": TUNE_SEEDS,
        "eval_seeds": EVAL_SEEDS,
        "algorithm": args.algorithm,
        "timesteps": args.timesteps,
        "best_static": train_env.space[best_action].label(),
        "static_scores": static_scores,
        "bandit": {
            "num_windows": bandit.num_windows,
            "num_explorations": bandit.num_explorations,
            "num_breaches": bandit.num_breaches,
            "exploration_breaches": bandit.exploration_breaches,
            "exploration_breach_share": explore_share,
        },
        "results": results,
        "wall_time_s": wall,
    }
    json_path = args.out / "rl-tuner-sim.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    png_path = args.out / "rl-tuner-sim.png"
    plot(
        results,
        png_path,
        f"knob tuning on held-out traces ({args.algorithm.upper()}, {args.timesteps} windows)",
    )
    print(f"wrote {json_path}, {png_path}, {model_path}")


if __name__ == "__main__":
    main()
