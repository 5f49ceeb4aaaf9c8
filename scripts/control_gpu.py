"""The adaptive control plane on a real GPU, in one process (run it on the device):

1. calibrate the step cost model of the model on this device (calibration waves + a serving-shaped replay);
2. fidelity: replay a different bursty workload on the real engine, simulate the same with the fitted
   model, compare step time and end-to-end metrics;
3. the claim: grid-search static knob settings in the simulator (in parallel on the host's cores), then
   run the adaptive engine and the best static settings for real on the same trace; goodput under a
   TTFT + TPOT SLO.

Writes JSON under --out. Usage: python scripts/control_gpu.py --model llama-3.1-8b --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from adaptserve.adapt.factory import enable_configured_control
from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.bench.arrivals import BurstyArrivals, DiurnalArrivals
from adaptserve.bench.metrics import calculate_metrics
from adaptserve.bench.workloads import ShareGPTShapedWorkload
from adaptserve.config import EngineConfig
from adaptserve.sim.calibrate import StepRecorder, calibrate, replay
from adaptserve.sim.cli import load_arch
from adaptserve.sim.simulation import Simulation

GRID = {"max_num_seqs": (32, 64, 128, 256), "max_num_batched_tokens": (512, 1024, 2048, 4096)}


def traces(kind: str, vocab_size: int, num: int, seed: int):
    requests = ShareGPTShapedWorkload(vocab_size=vocab_size).requests(num, seed)
    if kind == "bursty":
        process = BurstyArrivals(on_rate=args_rate * 1.6, off_rate=args_rate * 0.4, on_s=10.0, off_s=10.0)
    else:
        process = DiurnalArrivals(mean_rate=args_rate, amplitude=0.8, period_s=40.0)
    return requests, process.times(num, seed), process.describe()


def engine_config(model: str, knobs: dict, controllers=(), **extra) -> EngineConfig:
    options = dict(
        model=model,
        max_model_len=4096,
        max_num_seqs=256,
        max_num_batched_tokens=4096,
        async_scheduling=False,
        controllers=controllers,
        tpot_slo_s=SLO["tpot"] / 1e3,
        ttft_slo_s=SLO["ttft"] / 1e3,
        **extra,
    )
    options.update({k: v for k, v in knobs.items()})
    return EngineConfig.from_flat(**options)


def summarize(metrics: dict) -> dict:
    keys = (
        "completed", "request_throughput", "request_goodput", "mean_ttft_ms", "p90_ttft_ms",
        "mean_tpot_ms", "p90_tpot_ms", "p99_itl_ms", "duration",
    )  # fmt: skip
    return {k: metrics.get(k) for k in keys if k in metrics}


def simulate(job) -> dict:
    model, knobs, controllers, cost, kind, num, seed, replicas, kv_blocks = job
    arch = load_arch(model)
    requests, times, _ = traces(kind, arch.vocab_size, num, seed)
    config = engine_config(model, knobs, controllers, num_blocks=kv_blocks)
    sim = Simulation(requests, times, cost, config, arch, num_replicas=replicas)
    result = sim.run(SLO)
    out = {"knobs": knobs, "controllers": list(controllers), **summarize(result.metrics)}
    out["duration"] = result.duration
    if controllers:
        out["time_series"] = result.to_dict()["time_series"][0]
    return out


def real_run(engine_cfg: EngineConfig, engine, requests, times) -> dict:
    tracks = replay(engine, requests, times, request_prefix=f"r{time.monotonic_ns()}-")
    start = min(t.arrival_time for t in tracks)
    outcomes = [t.outcome(start) for t in tracks]
    duration = max(t.finish_time for t in tracks) - start
    return summarize(calculate_metrics(outcomes, duration, ("ttft", "tpot", "itl"), (50.0, 90.0, 99.0), SLO))


def main() -> None:
    global args_rate
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--rate", type=float, default=24.0, help="mean arrivals per second per replica")
    parser.add_argument("--num", type=int, default=900)
    parser.add_argument("--traces", default="bursty,diurnal")
    parser.add_argument("--profile", default=None, help="skip calibration: use this profile")
    parser.add_argument("--top", type=int, default=2, help="best static settings to run for real")
    parser.add_argument("--slo", default="ttft:2000,tpot:50")
    parser.add_argument("--kv-blocks", type=int, default=None)
    args = parser.parse_args()
    args_rate = args.rate
    SLO.update({k: float(v) for k, v in (item.split(":") for item in args.slo.split(","))})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": args.model, "slo_ms": dict(SLO), "rate": args.rate, "num": args.num}

    t0 = time.perf_counter()
    from adaptserve.engine.engine import LLMEngine

    base = engine_config(args.model, {})
    engine = LLMEngine(base, progress=False)
    kv_blocks = engine.runner.num_blocks
    ceilings = dict(zip(("max_num_seqs", "max_num_batched_tokens"), engine.knob_ceilings, strict=True))
    device = engine.runner.device
    import torch

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report.update(device=device_name, kv_blocks=kv_blocks, load_s=time.perf_counter() - t0)
    print(f"engine ready in {report['load_s']:.1f} s on {device_name}, {kv_blocks} KV blocks", flush=True)

    # 1. calibration
    if args.profile:
        cost = StepCostModel.load(args.profile)
    else:
        t = time.perf_counter()
        cost = calibrate(engine, device=device_name, max_prompt_len=1024)
        serving = StepRecorder("wall")
        engine.stat_loggers.append(serving)
        requests = ShareGPTShapedWorkload(vocab_size=engine.arch.vocab_size).requests(300, 11)
        times = list(np.cumsum(np.random.default_rng(11).exponential(1 / (1.5 * args.rate), 300)))
        replay(engine, requests, times, serving, request_prefix="cal-serve-")
        engine.stat_loggers.remove(serving)
        waves_model = (
            cost  # fitted to the calibration waves; the serving replay's shapes are the ones that matter
        )
        cost = StepCostModel.fit(serving.points, device_name)
        cost.save(out / "profile.json")
        report["calibration"] = {
            "seconds": time.perf_counter() - t,
            "model": dataclasses.asdict(cost),
            "waves_model": dataclasses.asdict(waves_model),
        }
        print(f"calibrated in {time.perf_counter() - t:.1f} s: {cost}", flush=True)

    # 2. fidelity: a different workload, real vs simulated, same knobs
    fidelity = {}
    kind0 = args.traces.split(",")[0]
    requests, times, arrivals = traces(kind0, engine.arch.vocab_size, args.num // 2, 5)
    recorder = StepRecorder("wall")
    engine.stat_loggers.append(recorder)
    tracks = replay(engine, requests, times, recorder, request_prefix="fid-")
    engine.stat_loggers.remove(recorder)
    start = min(t.arrival_time for t in tracks)
    real = summarize(
        calculate_metrics(
            [t.outcome(start) for t in tracks],
            max(t.finish_time for t in tracks) - start,
            ("ttft", "tpot", "itl"),
            (50.0, 90.0, 99.0),
            SLO,
        )
    )
    measured = np.array([p.seconds for p in recorder.points if p.seconds > 0])
    predicted = np.array([cost.predict_shape(p) for p in recorder.points if p.seconds > 0])
    simulated = simulate((args.model, {}, (), cost, kind0, args.num // 2, 5, 1, kv_blocks))
    fidelity = {
        "arrivals": arrivals,
        "real": real,
        "simulated": simulated,
        "step_time_mean_real_ms": float(measured.mean() * 1e3),
        "step_time_mean_predicted_ms": float(predicted.mean() * 1e3),
        "step_time_mean_abs_rel_error": float(np.mean(np.abs(predicted - measured) / measured)),
        "num_steps_real": int(len(measured)),
    }
    report["fidelity"] = fidelity
    print(json.dumps(fidelity, indent=1), flush=True)
    _write(out, report)

    # 3. the claim: static grid in the simulator, then adaptive and the best statics for real
    settings = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    report["claim"] = {}
    for kind in args.traces.split(","):
        jobs = [(args.model, s, (), cost, kind, args.num, 1, 1, kv_blocks) for s in settings]
        jobs.append((args.model, {}, ("batching",), cost, kind, args.num, 1, 1, kv_blocks))
        fork = multiprocessing.get_context("fork")  # workers simulate on the CPU and never touch CUDA
        with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 2), mp_context=fork) as pool:
            sims = list(pool.map(simulate, jobs))
        static = sorted(sims[:-1], key=lambda r: -r["request_goodput"])
        entry = {"sim_static": static, "sim_adaptive": sims[-1]}
        print(f"{kind}: sim best static {static[0]['knobs']} goodput {static[0]['request_goodput']:.2f}; "
              f"sim adaptive {sims[-1]['request_goodput']:.2f}", flush=True)  # fmt: skip
        requests, times, arrivals = traces(kind, engine.arch.vocab_size, args.num, 1)
        entry["arrivals"] = arrivals
        real_runs = []
        for candidate in static[: args.top]:
            for name, value in candidate["knobs"].items():
                engine.apply_knob(name, value)
            real_runs.append({"knobs": candidate["knobs"], **real_run(base, engine, requests, times)})
            print(f"  real static {candidate['knobs']}: {real_runs[-1]}", flush=True)
        for name, value in ceilings.items():  # back to the ceilings, then let the controllers move them
            engine.apply_knob(name, value)
        engine.config.control.controllers = ("batching",)
        plane = enable_configured_control(engine, prior=cost)
        adaptive = real_run(base, engine, requests, times)
        adaptive["switches"] = [dataclasses.asdict(s) for s in plane.switches.recent]
        print(f"  real adaptive: { {k: v for k, v in adaptive.items() if k != 'switches'} }", flush=True)
        engine.control = None
        engine.stat_loggers = [
            lg for lg in engine.stat_loggers if lg is not plane.telemetry and lg is not plane.step_cost
        ]
        engine.config.control.controllers = ()
        for name, value in ceilings.items():
            engine.apply_knob(name, value)
        entry["real_static"], entry["real_adaptive"] = real_runs, adaptive
        report["claim"][kind] = entry
        _write(out, report)
    print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)


def _write(out: Path, report: dict) -> None:
    (out / "control-gpu.json").write_text(json.dumps(report, indent=1, default=str) + "\n")


SLO: dict[str, float] = {}
args_rate = 24.0

if __name__ == "__main__":
    main()
