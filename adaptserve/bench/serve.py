"""`adaptserve bench serve`: a vLLM-compatible serving benchmark for any OpenAI-compatible server.

For each request rate, the same seeded workload is sent to every target (ours and any baselines, in
turn) at the arrival times of the chosen process; each run is summarized with vLLM's metric names.
One JSON (provenance first, then a run per target and rate) goes to docs/benchmarks/, plus a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import time
from typing import Any

import httpx
from tqdm.auto import tqdm

from adaptserve.bench import arrivals as arrival_processes
from adaptserve.bench.client import Target, request_body, send_request, served_models
from adaptserve.bench.metrics import (
    RequestOutcome,
    calculate_metrics,
    format_summary,
    parse_goodput,
    parse_percentiles,
)
from adaptserve.bench.workload_args import add_workload_args, load_tokenizer, workload_from_args
from adaptserve.bench.workloads import BenchRequest

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server under test")
    parser.add_argument("--backend", default="openai", choices=["openai", "openai-chat"])
    parser.add_argument("--model", default=None, help="model name to send; default: the server's first")
    parser.add_argument("--label", default="adaptserve", help="name of the server under test in results")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="another OpenAI-compatible server run on the same workload in the same run (repeatable)",
    )
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--request-rate", default="inf", help="requests/s; 'inf' sends all at once; a comma list sweeps"
    )
    parser.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape: 1 = Poisson, <1 burstier")
    parser.add_argument("--arrival", default="gamma", help="gamma | poisson | bursty | diurnal")
    parser.add_argument(
        "--arrival-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="bursty: on_rate, off_rate, on_s, off_s; diurnal: amplitude, period_s",
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--ignore-eos", action="store_true", help="ask for exactly the output lengths")
    parser.add_argument(
        "--goodput", nargs="+", default=None, metavar="METRIC:MS", help="e.g. ttft:500 tpot:50"
    )
    parser.add_argument("--percentile-metrics", default=",".join(PERCENTILE_METRICS))
    parser.add_argument("--metric-percentiles", default="50,90,99")
    parser.add_argument("--request-timeout", type=float, default=6 * 3600.0, help="seconds per request")
    parser.add_argument("--result-dir", default="docs/benchmarks")
    parser.add_argument("--result-name", default=None, help="file stem; default serve-<device tag>")
    parser.add_argument("--device-name", default=None, help="the server's device; default: this machine's")
    parser.add_argument("--save-detailed", action="store_true", help="keep every ITL gap and error text")
    parser.add_argument("--save-trace", default=None, metavar="FILE", help="also write the replayed trace")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--disable-tqdm", action="store_true")
    add_workload_args(parser)


def parse_rates(text: str) -> list[float]:
    rates = []
    for item in text.split(","):
        try:
            rate = float(item)
        except ValueError:
            raise ValueError(f"--request-rate: {item!r} is not a number or 'inf'") from None
        if not rate > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {item}")
        rates.append(rate)
    return rates


def parse_options(items: list[str], flag: str) -> dict[str, float]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"{flag}: expected KEY=NUMBER, got {item!r}")
    return options


def parse_baseline_servers(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"--baseline: expected NAME=http://host:port, got {item!r}")
        pairs.append((name, url))
    return pairs


def run_serve_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    rates = parse_rates(args.request_rate)
    goodput = parse_goodput(args.goodput) if args.goodput else None
    metrics_names = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    percentiles = parse_percentiles(args.metric_percentiles)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    tokenizer, vocab_size = load_tokenizer(args.tokenizer)
    vocab_size = args.vocab_size or vocab_size
    workload = workload_from_args(args, vocab_size, tokenizer)
    requests = workload.requests(args.num_prompts, args.seed)
    if requests[0].arrival_s is not None:
        rates = [math.nan]  # the trace's own times; one run per target

    targets = await _targets(args)
    bodies = {t.label: [request_body(t, r, args.ignore_eos, tokenizer) for r in requests] for t in targets}
    for target in targets:
        await _initial_test(target, requests[0], args, tokenizer)
    runs = []
    for rate in rates:
        process = _arrival_process(args, requests, rate)
        times = process.times(len(requests), args.seed)
        if args.save_trace:
            from adaptserve.bench.trace import save_trace

            save_trace(args.save_trace, requests, times)
        for target in targets:
            desc = f"{target.label} @ {_rate_text(rate)} req/s"
            outcomes, duration = await _benchmark(target, requests, bodies[target.label], times, args, desc)
            metrics = calculate_metrics(outcomes, duration, metrics_names, percentiles, goodput)
            print(
                format_summary(metrics, f"{target.label}, {process.describe()['name']} @ {_rate_text(rate)}")
            )
            runs.append(_run_record(target, process, rate, args, metrics))
    payload = {
        "backend": args.backend,
        "model": targets[0].model,
        "workload": {**workload.describe(), "num_prompts": args.num_prompts, "seed": args.seed},
        "arrivals": runs[0]["arrivals"],
        "ignore_eos": args.ignore_eos,
        "goodput_slos_ms": goodput,
        "runs": runs,
    }
    path = _write(args, payload)
    print(f"wrote {path}")
    if not args.no_plot:
        from adaptserve.bench.plot import plot_after_run

        plot_after_run(path)
    return payload


async def _targets(args: argparse.Namespace) -> list[Target]:
    chat = args.backend == "openai-chat"
    pairs = [(args.label, args.base_url), *parse_baseline_servers(args.baseline)]
    if len({name for name, _ in pairs}) != len(pairs):
        raise ValueError(f"--label and --baseline names must differ: {[name for name, _ in pairs]}")
    targets = []
    async with httpx.AsyncClient() as client:
        for label, url in pairs:
            model = args.model
            if model is None:
                models = await served_models(client, url)
                if not models:
                    raise ValueError(f"{url}/v1/models lists no model; pass --model")
                model = models[0]
            targets.append(Target(label, url, model, chat=chat, api_key=args.api_key))
    return targets


def _arrival_process(args: argparse.Namespace, requests: list[BenchRequest], rate: float):
    if requests[0].arrival_s is not None:
        return arrival_processes.TraceArrivals(tuple(r.arrival_s for r in requests))
    options = parse_options(args.arrival_option, "--arrival-option")
    return arrival_processes.parse_arrivals(args.arrival, rate, args.burstiness, options)


async def _initial_test(target: Target, request: BenchRequest, args, tokenizer) -> None:
    """One short request first, as vLLM does, so a wrong URL or model fails in seconds, not per request."""
    probe = BenchRequest(request.prompt, request.prompt_len, min(request.output_len, 4))
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout)) as client:
        outcome = await send_request(
            client,
            target,
            probe,
            request_body(target, probe, args.ignore_eos, tokenizer),
            time.perf_counter(),
        )
    if not outcome.success:
        raise ValueError(f"initial test request to {target.url} failed: {outcome.error}")


async def _benchmark(
    target: Target,
    requests: list[BenchRequest],
    bodies: list[dict[str, Any]],
    times: list[float],
    args: argparse.Namespace,
    desc: str,
) -> tuple[list[RequestOutcome], float]:
    """Send every request at its arrival time; duration runs from the first dispatch to the last reply."""
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=args.disable_tqdm)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.request_timeout)) as client:
        start = time.perf_counter()

        async def one(request: BenchRequest, body: dict[str, Any]) -> RequestOutcome:
            async with limit:  # as vLLM: a request waiting for a slot is not yet sent, so not yet timed
                outcome = await send_request(client, target, request, body, start)
            bar.update(1)
            return outcome

        tasks = []
        for request, body, offset in zip(requests, bodies, times, strict=True):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request, body)))
        outcomes = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(outcomes), duration


def _run_record(target: Target, process, rate: float, args, metrics: dict[str, Any]) -> dict[str, Any]:
    record = {
        "label": target.label,
        "base_url": target.base_url,
        "request_rate": "trace" if math.isnan(rate) else arrival_processes.json_rate(rate),
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "arrivals": process.describe(),
    }
    errors = metrics.pop("errors")
    itls = metrics.pop("itls")
    record.update(metrics)
    record["error_counts"] = dict(collections.Counter(_error_kind(e) for e in errors if e))
    for key in ("ttfts", "e2els", "start_times"):
        record[key] = [round(x, 5) for x in record[key]]
    if args.save_detailed:
        record["itls"] = [[round(x, 5) for x in gaps] for gaps in itls]
        record["errors"] = errors
    return record


def _error_kind(error: str) -> str:
    return error.split(":", 1)[0][:60]


def _rate_text(rate: float) -> str:
    return "trace" if math.isnan(rate) else "inf" if math.isinf(rate) else f"{rate:g}"


def _write(args: argparse.Namespace, payload: dict[str, Any]):
    import torch

    from adaptserve.bench.results import write_results

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return write_results(
        "serve",
        device,
        payload,
        args.result_dir,
        device_description=args.device_name,
        file_stem=args.result_name,
        command=getattr(args, "command_line", None),
    )
