"""The claim at cluster scale, in the simulator: N replicas (default 8) behind the least-loaded router on
the H100 llama-3.1-8b profile; a grid of static knob settings against the adaptive batching controller,
on the bursty and the diurnal trace; goodput under a TTFT + TPOT SLO. Writes JSON and a plot.

Usage: python scripts/adaptive_vs_static_sim.py [--replicas 8] [--rate 45] [--num 600]
(rate and num are per replica)."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import control_gpu

from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.bench.results import git_commit

PROFILE = Path(__file__).parent.parent / "adaptserve/sim/profiles/h100-llama-3.1-8b.json"
GRID = {"max_num_seqs": (64, 128, 256), "max_num_batched_tokens": (1024, 4096)}


def _job(job):
    control_gpu.SLO.update(job[-1])
    control_gpu.args_rate = job[-2]
    return control_gpu.simulate(job[:-2])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--rate", type=float, default=45.0, help="mean arrivals per second per replica")
    parser.add_argument("--num", type=int, default=600, help="requests per replica")
    parser.add_argument(
        "--kv-blocks", type=int, default=25935, help="per replica (the H100's, 0.85 of memory)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="docs/benchmarks/adaptive-vs-static-sim.json")
    args = parser.parse_args()
    slo = {"ttft": 2000.0, "tpot": 50.0}
    cost = StepCostModel.load(PROFILE)
    rate, num = args.rate * args.replicas, args.num * args.replicas
    settings = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    report = {
        "replicas": args.replicas,
        "rate_per_replica": args.rate,
        "slo_ms": slo,
        "profile": str(PROFILE),
    }
    report.update(date=time.strftime("%Y-%m-%d"), git_commit=git_commit(), device="sim:" + cost.device)
    start = time.perf_counter()
    for kind in ("bursty", "diurnal"):
        jobs = [
            ("llama-3.1-8b", s, (), cost, kind, num, 1, args.replicas, args.kv_blocks, rate, slo)
            for s in settings
        ]
        jobs.append(
            ("llama-3.1-8b", {}, ("batching",), cost, kind, num, 1, args.replicas, args.kv_blocks, rate, slo)
        )
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(_job, jobs))
        static = sorted(results[:-1], key=lambda r: -r["request_goodput"])
        adaptive = results[-1]
        gain = adaptive["request_goodput"] / static[0]["request_goodput"] - 1
        report[kind] = {"static": static, "adaptive": adaptive, "gain_vs_best_static": gain}
        print(
            f"{kind}: best static {static[0]['knobs']} {static[0]['request_goodput']:.2f} req/s; "
            f"adaptive {adaptive['request_goodput']:.2f} req/s ({gain:+.1%}); "
            f"worst static {static[-1]['knobs']} {static[-1]['request_goodput']:.2f}",
            flush=True,
        )
    report["wall_s"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {args.out} in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
