"""`adaptserve bench kv`: KV-cache compression — quality of each format against bf16 KV, capacity at
one KV budget, and a load ramp to twice what bf16 holds (static bf16 against the adaptive policy).
One JSON (docs/benchmarks/kv-<device>.json) and its plot."""

from __future__ import annotations

import argparse
import time

from adaptserve.bench.results import DEFAULT_MODEL_LABEL, write_results

PARTS = ("quality", "capacity", "ramp")


def add_kv_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--num-prompts", type=int, default=50, help="quality: chat prompts")
    parser.add_argument("--text-tokens", type=int, default=20480, help="quality: perplexity text tokens")
    parser.add_argument(
        "--quality-formats",
        default="fp8,int8,int4",
        help="quality: formats measured beside bf16 (e.g. int4k)",
    )
    parser.add_argument(
        "--file-stem", default=None, help="result file name without .json; default kv-<device>"
    )
    parser.add_argument("--ramp-requests", type=int, default=48, help="ramp: requests arriving")
    parser.add_argument("--ramp-max-tokens", type=int, default=96, help="ramp: tokens each generates")
    parser.add_argument("--ramp-blocks", type=int, default=96, help="ramp: KV memory as bf16 blocks")
    parser.add_argument(
        "--ramp-settings",
        default="bf16,adaptive",
        help="ramp: rows, of bf16 (static), adaptive (with --kv-ladder, --kv-error-budget, "
        "--kv-hot-window) and adaptive-hotN (the same with an N-block hot window)",
    )
    parser.add_argument("--result-dir", default="docs/benchmarks")


def run_kv_benchmark(args: argparse.Namespace) -> dict:
    import torch

    from adaptserve.bench.kv_capacity import measure_kv_capacity
    from adaptserve.bench.kv_quality import KVQualitySpec, measure_kv_quality, summary_table
    from adaptserve.bench.kv_ramp import run_ramp
    from adaptserve.model.loaders import load_checkpoint

    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; known: {', '.join(PARTS)}")
    checkpoint = load_checkpoint(args.model, progress=False)
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    payload: dict = {"model": args.model or DEFAULT_MODEL_LABEL}
    start = time.perf_counter()
    if "quality" in parts:
        formats = tuple(f for f in args.quality_formats.split(",") if f)
        spec = KVQualitySpec(
            num_prompts=args.num_prompts, num_text_tokens=args.text_tokens, formats=formats, device=device
        )
        payload["quality"] = measure_kv_quality(checkpoint, spec, log=print)
    if "capacity" in parts:
        payload["capacity"] = measure_kv_capacity(checkpoint, device=device, log=print)
    if "ramp" in parts:
        settings = ramp_settings(args)
        payload["ramp"] = run_ramp(
            checkpoint, settings, args.ramp_requests, args.ramp_max_tokens, args.ramp_blocks, device=device
        )
    payload["seconds"] = round(time.perf_counter() - start, 1)
    path = write_results("kv", torch.device(device), payload, args.result_dir, file_stem=args.file_stem)
    print(summary_table(payload.get("quality"), payload.get("capacity")))
    for name, row in payload.get("ramp", {}).get("rows", {}).items():
        agreement = row["agreement"]["agreement_to_divergence"]
        print(
            f"ramp {name:>9}: lost {row['lost']} preemptions {row['preemptions']} peak running "
            f"{row['peak_running']} mean TTFT {row['mean_ttft_steps']} steps, {row['tokens_per_s']} tok/s "
            f"({row['steady_tokens_per_s']} without {row['outlier_steps']} one-off steps of "
            f"{row['outlier_seconds']} s), "
            f"agreement to divergence {agreement:.4f}"
        )
    print(f"wrote {path}")
    from adaptserve.bench.plot import plot_after_run

    plot_after_run(path)
    return payload


def ramp_settings(args: argparse.Namespace) -> dict[str, dict]:
    """The ramp's rows (name -> engine options) from --ramp-settings and the KV flags."""
    adaptive = {
        "kv_policy": "adaptive",
        "kv_ladder": tuple(args.kv_ladder.split(",")),
        "kv_error_budget": args.kv_error_budget,
        "kv_hot_window": args.kv_hot_window,
    }
    settings = {}
    for name in (n for n in args.ramp_settings.split(",") if n):
        window = name.removeprefix("adaptive-hot")
        if name == "bf16":
            settings[name] = {}
        elif name == "adaptive":
            settings[name] = dict(adaptive)
        elif window != name and window.isdigit():
            settings[name] = {**adaptive, "kv_hot_window": int(window)}
        else:
            raise SystemExit(f"--ramp-settings: unknown {name!r}; known: bf16, adaptive, adaptive-hotN")
    return settings
