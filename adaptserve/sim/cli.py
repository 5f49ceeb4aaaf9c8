"""`adaptserve sim run | calibrate`: the simulator from the command line.

`run` takes the workload and arrival flags of `bench serve`, a step cost profile, a replica count and a
router, prints the same summary, and writes a result JSON whose device is "sim:<profile device>".
`calibrate` times a real engine and writes the profile JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

from adaptserve.sim.router import ROUTERS


def add_sim_parser(subparsers) -> None:
    sim = subparsers.add_parser("sim", help="simulate serving on a calibrated step cost model")
    commands = sim.add_subparsers(dest="sim_command", required=True)
    run = commands.add_parser("run", help="a workload on N simulated replicas; bench serve's metrics")
    add_run_args(run)
    calibrate = commands.add_parser("calibrate", help="time a real engine and write a step cost profile")
    add_calibrate_args(calibrate)
    for parser in (run, calibrate):
        parser.set_defaults(func=_main)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    from adaptserve.bench.workload_args import add_workload_args

    parser.add_argument("--profile", required=True, help="step cost profile JSON (sim calibrate writes one)")
    parser.add_argument("--model", default="smollm2-135m", help="preset, .gguf or HF folder (its shape)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--router", default="least_loaded", choices=sorted(ROUTERS))
    parser.add_argument("--request-rate", default="inf", help="requests/s; inf = all at once; a list")
    parser.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape: 1 = Poisson, <1 burstier")
    parser.add_argument("--arrival", default="gamma", help="gamma | poisson | bursty | diurnal")
    parser.add_argument("--arrival-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS", help="ttft:500 tpot:50")
    parser.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    parser.add_argument("--metric-percentiles", default="50,90,99")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--prefill-chunk", type=int, default=0, help="longest prompt chunk; 0 = the budget")
    parser.add_argument("--batch-wait-s", type=float, default=0.0)
    parser.add_argument("--precision-policy", default="native", choices=["native", "bf16", "fp8", "int4"])
    parser.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks per replica; default: ample")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None, help="KV budget per replica")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--noise", type=float, default=0.0, help="relative spread of step times")
    parser.add_argument("--sample-interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--result-dir", default="docs/benchmarks")
    parser.add_argument("--result-name", default=None, help="file stem; default sim-<profile stem>")
    add_workload_args(parser)


def add_calibrate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF folder, .gguf file or preset; default: SmolLM2")
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-prompt-len", type=int, default=512, help="longest calibration prompt")
    parser.add_argument("--output", default=None, help="profile path; default adaptserve/sim/profiles/...")


def _main(args: argparse.Namespace) -> int:
    if args.sim_command == "calibrate":
        from adaptserve.sim.calibrate import run_calibration

        run_calibration(args)
    else:
        run_simulation(args)
    return 0


def load_arch(spec: str):
    """The architecture of a preset, a .gguf file (header only) or an HF folder (config.json): no weights."""
    import json

    from adaptserve.model.config import PRESETS, ModelArchConfig, get_preset

    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from adaptserve.model.loaders.gguf_file import read_gguf_header
        from adaptserve.model.loaders.gguf_loader import arch_from_gguf

        return arch_from_gguf(read_gguf_header(path))
    if (path / "config.json").is_file():
        return ModelArchConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    presets = ", ".join(sorted(PRESETS))
    raise ValueError(f"--model {spec!r}: not a preset ({presets}), a .gguf file or an HF folder")


def run_simulation(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from adaptserve.adapt.step_cost import StepCostModel
    from adaptserve.bench.metrics import format_summary, parse_goodput, parse_percentiles
    from adaptserve.bench.results import write_results
    from adaptserve.bench.serve import _arrival_process, _rate_text, parse_rates
    from adaptserve.bench.workload_args import load_tokenizer, workload_from_args
    from adaptserve.config import EngineConfig
    from adaptserve.sim.simulation import Simulation

    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if not Path(args.profile).is_file():
        raise ValueError(f"--profile {args.profile}: no such file; `adaptserve sim calibrate` writes one")
    cost_model = StepCostModel.load(args.profile)
    arch = load_arch(args.model)
    goodput = parse_goodput(args.goodput) if args.goodput else None
    metric_names = tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip())
    percentiles = tuple(parse_percentiles(args.metric_percentiles))
    tokenizer = load_tokenizer(args.tokenizer)[0] if args.tokenizer else None
    workload = workload_from_args(args, args.vocab_size or arch.vocab_size, tokenizer)
    requests = workload.requests(args.num_prompts, args.seed)
    config = EngineConfig.from_flat(
        model=args.model,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.prefill_chunk,
        batch_wait_s=args.batch_wait_s,
        precision_policy=args.precision_policy,
        policy=args.scheduling_policy,
        num_blocks=args.num_blocks,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        enable_prefix_caching=not args.no_prefix_caching,
    )
    rates = [math.nan] if requests[0].arrival_s is not None else parse_rates(args.request_rate)
    runs = []
    for rate in rates:
        process = _arrival_process(args, requests, rate)
        times = process.times(len(requests), args.seed)
        sim = Simulation(
            requests,
            times,
            cost_model,
            config,
            arch,
            num_replicas=args.replicas,
            router=args.router,
            sample_interval_s=args.sample_interval,
            noise=args.noise,
            seed=args.seed,
        )
        result = sim.run(goodput, metric_names, percentiles)
        title = f"sim x{args.replicas} {args.router}, {process.describe()['name']} @ {_rate_text(rate)}"
        print(format_summary(result.metrics, title))
        print(f"simulated {result.duration:.1f} s in {result.wall_time:.1f} s; steps {result.num_steps}")
        runs.append(_run_record(process, rate, args, result))
    payload = {
        "model": args.model,
        "profile": str(args.profile),
        "step_cost_model": dataclasses.asdict(cost_model),
        "replicas": args.replicas,
        "router": args.router,
        "workload": {**workload.describe(), "num_prompts": args.num_prompts, "seed": args.seed},
        "goodput_slos_ms": goodput,
        "runs": runs,
    }
    path = write_results(
        "sim",
        torch.device("cpu"),
        payload,
        args.result_dir,
        device_description=f"sim:{cost_model.device}",
        file_stem=args.result_name or f"sim-{Path(args.profile).stem}",
        command=getattr(args, "command_line", None),
    )
    print(f"wrote {path}")
    return payload


def _run_record(process, rate: float, args: argparse.Namespace, result) -> dict[str, Any]:
    from adaptserve.bench.arrivals import json_rate

    metrics = dict(result.metrics)
    metrics.pop("itls")
    errors = metrics.pop("errors")
    for key in ("ttfts", "e2els", "start_times"):
        metrics[key] = [round(x, 5) for x in metrics[key]]
    return {
        "request_rate": "trace" if math.isnan(rate) else json_rate(rate),
        "burstiness": args.burstiness,
        "arrivals": process.describe(),
        **metrics,
        "num_errors": sum(1 for e in errors if e),
        "num_steps": result.num_steps,
        "wall_time": result.wall_time,
        "time_series": result.to_dict()["time_series"],
    }
