"""`adaptserve bench precision`: the command line and report of bench/precision_quality.py (see its
docstring for what is measured): arguments, the JSON under docs/benchmarks/, the markdown table."""

from __future__ import annotations

import argparse
import time
from typing import Any

from adaptserve.bench.plot import plot_after_run
from adaptserve.bench.precision_quality import QualitySpec, measure_precision_quality
from adaptserve.bench.results import DEFAULT_MODEL_LABEL, RESULTS_DIR, device_tag, write_results
from adaptserve.config import WEIGHT_FORMATS


def markdown_table(result: dict[str, Any]) -> str:
    """The headline numbers: one row per fixed format, one for the adaptive policy."""
    lines = [
        "| policy | teacher-forced top-1 agreement | free-running agreement to 1st divergence "
        "| free-running positional match | identical replies | perplexity |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["formats"].items():
        fr = row["free_running"]
        lines.append(
            f"| {name} | {row['teacher_forced']['agreement']:.2%} | {fr['agreement_to_divergence']:.2%} "
            f"| {fr['positional_match']:.2%} | {fr['identical']:.0%} | {row['perplexity']:.3f} |"
        )
    adaptive = result.get("adaptive")
    if adaptive is not None:
        fr, tf = adaptive["free_running"], adaptive.get("teacher_forced")
        forced = f"{tf['agreement']:.2%}" if tf else "not run"
        lines.append(
            f"| adaptive (per step, batch 1) | {forced} | {fr['agreement_to_divergence']:.2%} "
            f"| {fr['positional_match']:.2%} | {fr['identical']:.0%} | n/a |"
        )
        lines.append("")
        for run_name, run in (("free-running", fr), ("teacher-forced", tf)):
            if run is not None:
                lines.append(f"- adaptive, {run_name}: {_adaptive_summary(run)}")
        if tf:
            by_precision = ", ".join(
                f"{p} {v['agreement']:.2%} of {v['tokens']}" for p, v in tf["agreement_by_precision"].items()
            )
            lines.append(f"- adaptive, teacher-forced agreement by the precision of the step: {by_precision}")
    return "\n".join(lines)


def _adaptive_summary(run: dict[str, Any]) -> str:
    mix = ", ".join(f"{p} {n}" for p, n in run["decode_steps_by_precision"].items())
    shadow = run["shadow_agreement"]
    shadowed = (
        f"{shadow:.2%} of {run['shadowed_tokens']} tokens" if shadow is not None else "no step shadowed"
    )
    return f"decode steps {mix}; {run['switches']} switches; shadow agreement {shadowed}"


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    defaults = QualitySpec()
    parser.add_argument("--model", default=None, help="HF folder or .gguf file; default: embedded SmolLM2")
    parser.add_argument("--device", default=defaults.device, help="cpu | cuda | cuda:N")
    parser.add_argument("--num-prompts", type=int, default=defaults.num_prompts)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="greedy reply length")
    parser.add_argument("--text-tokens", type=int, default=defaults.num_text_tokens, help="perplexity text")
    parser.add_argument("--window", type=int, default=defaults.window, help="perplexity window")
    parser.add_argument("--formats", default=",".join(defaults.formats), help="fixed formats to measure")
    parser.add_argument("--no-adaptive", action="store_true", help="skip the adaptive policy")
    parser.add_argument(
        "--no-adaptive-teacher-forced", action="store_true", help="run the adaptive policy free only"
    )
    parser.add_argument("--int4-group-size", type=int, default=defaults.int4_group_size)
    parser.add_argument(
        "--quantize-lm-head", action="store_true", help="the LM head in each format too (default: native)"
    )
    parser.add_argument(
        "--file-stem", default=None, help="result file name; default precision-quality-<device>"
    )
    parser.add_argument("--quality-budget", type=float, default=defaults.quality_budget)
    parser.add_argument("--shadow-rate", type=float, default=defaults.shadow_rate)
    parser.add_argument("--result-dir", default=None, help="default: docs/benchmarks")
    parser.add_argument("--no-plot", action="store_true")


def run_precision_quality_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, write precision-quality-<device>.json (and .png), print the table."""
    from adaptserve.model.loaders import load_checkpoint
    from adaptserve.runner.device import resolve_device

    device = resolve_device(args.device)
    spec = QualitySpec(
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
        num_text_tokens=args.text_tokens,
        window=args.window,
        formats=tuple(f for f in args.formats.split(",") if f),
        adaptive=not args.no_adaptive,
        adaptive_teacher_forced=not args.no_adaptive_teacher_forced,
        int4_group_size=args.int4_group_size,
        quantize_lm_head=args.quantize_lm_head,
        quality_budget=args.quality_budget,
        shadow_rate=args.shadow_rate,
        device=str(device),
    )
    unknown = set(spec.formats) - set(WEIGHT_FORMATS)
    if unknown:
        raise ValueError(
            f"--formats has unknown format(s) {sorted(unknown)}; known: {', '.join(WEIGHT_FORMATS)}"
        )
    start = time.perf_counter()
    checkpoint = load_checkpoint(args.model, progress=False)
    result = measure_precision_quality(checkpoint, spec, log=lambda line: print(line, flush=True))
    payload = {
        "model": args.model or DEFAULT_MODEL_LABEL,
        **result,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    path = write_results(
        "precision_quality",
        device,
        payload,
        out_dir=args.result_dir or RESULTS_DIR,
        file_stem=args.file_stem or f"precision-quality-{device_tag(device)}",
        command=getattr(args, "command_line", None),
    )
    print(markdown_table(result))
    print(f"wrote {path}")
    if not args.no_plot:
        plot_after_run(path)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m adaptserve.bench.precision_cli [options]`, the same as `adaptserve bench precision`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_precision_args(parser)
    return run_precision_quality_benchmark(parser.parse_args(argv))


if __name__ == "__main__":
    main()
