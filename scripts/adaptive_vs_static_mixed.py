"""Adaptive batching against every static setting of a grid where the TPOT SLO binds: one replica on
the H100 llama-3.1-8b profile, ShareGPT-shaped traffic with a share of long prompts (2k-8k tokens),
on a bursty trace of several on/off cycles; goodput under a TTFT + TPOT SLO. (On plain ShareGPT-shaped
traffic the TPOT SLO never binds and the best static setting is every knob at its ceiling, which the
controller can only tie: see adaptive_vs_static_sim.py.) Writes JSON.

Usage: python scripts/adaptive_vs_static_mixed.py [--rate 22] [--num 1300] [--slo ttft:2000,tpot:30]
       [--arrival bursty|diurnal] [--long-fraction 0.1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.bench.arrivals import BurstyArrivals, DiurnalArrivals
from adaptserve.bench.results import git_commit
from adaptserve.bench.workloads import MixedLengthWorkload
from adaptserve.config import EngineConfig
from adaptserve.sim.cli import load_arch
from adaptserve.sim.simulation import Simulation

PROFILE = Path(__file__).parent.parent / "adaptserve/sim/profiles/h100-llama-3.1-8b.json"
GRID = {"max_num_seqs": (64, 128, 256), "max_num_batched_tokens": (512, 1024, 2048, 4096)}
KV_BLOCKS = 25935  # the H100's at 0.85 of memory


def simulate(job: tuple) -> dict:
    knobs, controllers, args = job
    cost, arch = StepCostModel.load(PROFILE), load_arch("llama-3.1-8b")
    workload = MixedLengthWorkload(
        arch.vocab_size, long_fraction=args.long_fraction, long_min_len=2048, long_max_len=8192
    )
    requests = workload.requests(args.num, args.seed)
    if args.arrival == "bursty":
        process = BurstyArrivals(on_rate=args.rate * 1.6, off_rate=args.rate * 0.4, on_s=10.0, off_s=10.0)
    else:
        process = DiurnalArrivals(mean_rate=args.rate, amplitude=0.8, period_s=40.0)
    options = dict(
        model="llama-3.1-8b",
        max_model_len=16384,
        max_num_seqs=256,
        max_num_batched_tokens=4096,
        async_scheduling=False,
        controllers=controllers,
        tpot_slo_s=args.slo["tpot"] / 1e3,
        ttft_slo_s=args.slo["ttft"] / 1e3,
        num_blocks=KV_BLOCKS,
    )
    options.update(knobs)
    result = Simulation(
        requests, process.times(args.num, args.seed), cost, EngineConfig.from_flat(**options), arch
    ).run(args.slo)
    keys = (
        "request_goodput",
        "request_throughput",
        "mean_ttft_ms",
        "p90_ttft_ms",
        "mean_tpot_ms",
        "p90_tpot_ms",
    )
    return {"knobs": knobs, "controllers": list(controllers), "duration": result.duration} | {
        k: result.metrics[k] for k in keys
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=22.0, help="mean arrivals per second")
    parser.add_argument("--num", type=int, default=1300)
    parser.add_argument("--slo", default="ttft:2000,tpot:30")
    parser.add_argument("--arrival", choices=("bursty", "diurnal"), default="bursty")
    parser.add_argument("--long-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="docs/benchmarks/adaptive-vs-static-mixed-sim.json")
    args = parser.parse_args()
    args.slo = {k: float(v) for k, v in (item.split(":") for item in args.slo.split(","))}
    settings = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    jobs = [(s, (), args) for s in settings] + [({}, ("batching",), args)]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(simulate, jobs))
    static = sorted(results[:-1], key=lambda r: -r["request_goodput"])
    adaptive = results[-1]
    gain = adaptive["request_goodput"] / static[0]["request_goodput"] - 1
    for r in [*static, adaptive]:
        label = (
            "adaptive"
            if r["controllers"]
            else f"{r['knobs']['max_num_seqs']}/{r['knobs']['max_num_batched_tokens']}"
        )
        print(
            f"{label:>10}: goodput {r['request_goodput']:6.2f} of {r['request_throughput']:6.2f} req/s, "
            f"mean TTFT {r['mean_ttft_ms']:7.0f} ms, p90 TPOT {r['p90_tpot_ms']:5.1f} ms"
        )
    print(f"adaptive vs best static: {gain:+.1%}; ceiling (goodput = throughput): "
          f"{adaptive['request_throughput'] / static[0]['request_goodput'] - 1:+.1%}")  # fmt: skip
    report = {
        "profile": str(PROFILE.name),
        "device": "sim:" + StepCostModel.load(PROFILE).device,
        "date": time.strftime("%Y-%m-%d"),
        "git_commit": git_commit(),
        "args": {k: v for k, v in vars(args).items()},
        "static": static,
        "adaptive": adaptive,
        "gain_vs_best_static": gain,
        "wall_s": time.perf_counter() - start,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
