"""`adaptserve bench plot`: one PNG per benchmark JSON under docs/benchmarks/.

Each benchmark kind ("serve", "decode", "offline", "overload", "prefill", "startup",
"offline_scheduling", and the kernel sweeps "gemv" and "decode_split") has one function that draws
its panels (the GPU fast path's kinds in plot_fast_path.py, shared helpers in plot_parts.py);
`plot_file` dispatches on the JSON's "benchmark" key, adds a footnote with device, date and
commit, and writes `<json stem>.png`. Figures are plain `matplotlib.figure.Figure` objects saved by
the Agg canvas, so no pyplot state lives between files and matplotlib (the `bench` extra) is only
imported when something is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from adaptserve.bench.plot_fast_path import (
    decode_split_figure,
    gemv_figure,
    offline_scheduling_figure,
    prefill_figure,
    startup_figure,
)
from adaptserve.bench.plot_kv import kv_decode_figure, kv_figure
from adaptserve.bench.plot_parts import figure, grouped_bars
from adaptserve.bench.plot_precision import precision_quality_figure, quant_gemv_figure
from adaptserve.bench.plot_spec import spec_figure

RESULTS_DIR = Path("docs/benchmarks")
# One colour map per serve label; a label's runs get darker shades as the request rate rises.
LABEL_CMAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")


def add_plot_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files", nargs="*", type=Path, help=f"benchmark JSON files (default: every {RESULTS_DIR}/*.json)"
    )
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="where PNGs go (default: next to each JSON)"
    )


def run_plot(args: argparse.Namespace) -> list[Path]:
    """Plot every file in `args.files` (default: docs/benchmarks/*.json); returns the PNGs written."""
    files = [Path(f) for f in args.files] or sorted(RESULTS_DIR.glob("*.json"))
    if not files:
        print(f"no benchmark JSON files under {RESULTS_DIR}/")
    written = []
    for path in files:
        for png in plot_file(path, args.out_dir):
            print(f"wrote {png}")
            written.append(png)
    return written


def plot_file(path: Path, out_dir: Path | None = None) -> list[Path]:
    """Draw `<stem>.png` for one benchmark JSON; returns [] (with a note) for kinds without a plot."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    kind = data.get("benchmark") if isinstance(data, dict) else None
    draw = PLOTTERS.get(kind)
    if draw is None:
        print(f"skipping {path}: no plot for benchmark '{kind}'")
        return []
    fig = draw(data)
    footnote = (
        f"{data.get('device', '?')}  ·  {data.get('date', '?')}  ·  commit {data.get('git_commit', '?')}"
    )
    fig.text(0.005, 0.005, footnote, fontsize=7, color="0.4", ha="left", va="bottom")
    out_dir = Path(out_dir) if out_dir is not None else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{path.stem}.png"
    fig.savefig(png, dpi=120)
    return [png]


def plot_after_run(path: Path) -> None:
    """Plot a result a benchmark has just written; without matplotlib (a bare GPU box) say how to
    plot it later instead of failing the run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: run `adaptserve bench plot {path}` where it is")
        return
    for png in plot_file(path):
        print(f"wrote {png}")


# ----- serve: latency and throughput over request rates, latency CDFs ------------------------------


def _rate(run: dict[str, Any]) -> tuple[float, bool]:
    """(x position, unlimited?): the offered rate, or the achieved one when the rate was "inf"."""
    rate = run.get("request_rate")
    if isinstance(rate, (int, float)) and math.isfinite(rate):
        return float(rate), False
    return float(run.get("request_throughput") or 0.0), True


def _run_name(run: dict[str, Any], sep: str = " @ ") -> str:
    rate, unlimited = _rate(run)
    return f"{run.get('label', '?')}{sep}" + (
        f"inf (achieved {rate:.3g} req/s)" if unlimited else f"{rate:g} req/s"
    )


def _latency_stats(run: dict[str, Any], metric: str) -> dict[str, float]:
    """Median and tail (p99, else the highest percentile present) of `metric` in ms; absent ones left out."""
    if run.get("completed") == 0:
        return {}  # the client reports 0 ms for runs where every request failed
    stats = {}
    median = run.get(f"median_{metric}_ms", run.get(f"p50_{metric}_ms"))
    if median is not None:
        stats["median"] = median
    percentiles = {}
    for key, value in run.items():
        match = re.fullmatch(rf"p([\d.]+)_{metric}_ms", key)
        if match and value is not None and float(match.group(1)) > 50:
            percentiles[float(match.group(1))] = (f"p{match.group(1)}", value)
    if percentiles:
        name, value = percentiles.get(99.0) or percentiles[max(percentiles)]
        stats[name] = value
    return stats


def _rate_panel(ax, runs, labels, values, colors, sweep: bool, ylabel: str) -> None:
    """Lines over the request rate (one per label and series) when some label was run at >= 2 rates,
    else bars per run. `values[i]` maps series name ("median", "p99", ...) to y for runs[i]."""
    ax.set_ylabel(ylabel)
    if not sweep:
        grouped_bars(ax, [_run_name(run, "\n") for run in runs], values)
        return
    for label, color in zip(labels, colors, strict=True):
        label_runs = [(run, value) for run, value in zip(runs, values, strict=True) if run["label"] == label]
        names = list(dict.fromkeys(name for _, value in label_runs for name in value))
        for name, style in zip(names, ("-o", "--s", ":^"), strict=False):
            points = [(*_rate(run), value[name]) for run, value in label_runs if value.get(name) is not None]
            if not points:
                continue
            xs, _, ys = zip(*points, strict=True)
            ax.plot(xs, ys, style, color=color, label=f"{label} {name}".strip())
            for x, unlimited, y in points:
                if unlimited:  # ring the points measured at rate "inf"
                    ax.scatter([x], [y], s=160, facecolors="none", edgecolors=color, linewidths=1.5)
    unlimited = any(_rate(run)[1] for run in runs)
    ax.set_xlabel("request rate (req/s)" + ("; ○ = rate inf, achieved" if unlimited else ""))
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no completed requests", transform=ax.transAxes, ha="center", color="0.4")


def _cdf(ax, runs, colors, key: str, scale: float, xlabel: str) -> None:
    """Empirical CDF per run of the per-request list `key`, leaving out requests that report an error."""
    drawn = False
    for run, color in zip(runs, colors, strict=True):
        values = run.get(key) or []
        errors = run.get("errors") or []
        if len(errors) == len(values):
            values = [v for v, error in zip(values, errors, strict=True) if not error]
        values = sorted(v * scale for v in values if v is not None)
        if values:
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, ys, where="post", color=color, label=_run_name(run))
            drawn = True
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no completed requests", transform=ax.transAxes, ha="center", color="0.4")
    ax.set(xlabel=xlabel, ylabel="fraction of requests", ylim=(0, 1.02))


def _serve_figure(data: dict[str, Any]):
    from matplotlib import colormaps

    labels = list(dict.fromkeys(run.get("label", "?") for run in data.get("runs", [])))
    runs = [{**run, "label": run.get("label", "?")} for run in data.get("runs", [])]
    runs.sort(key=lambda run: (labels.index(run["label"]), _rate(run)[0]))
    cmaps = {label: colormaps[LABEL_CMAPS[i % len(LABEL_CMAPS)]] for i, label in enumerate(labels)}
    label_colors = [cmaps[label](0.75) for label in labels]
    run_colors = []
    for label in labels:
        num = sum(run["label"] == label for run in runs)
        run_colors += [cmaps[label](0.45 + 0.5 * i / max(1, num - 1)) for i in range(num)]

    workload = data.get("workload") or {}
    arrivals = data.get("arrivals") or {}
    title = f"serve: {data.get('model', '?')}, workload {workload.get('name', '?')}"
    title += f", arrivals {arrivals.get('name', '?')}"
    mosaic = [["ttft"] * 2 + ["tpot"] * 2 + ["tput"] * 2, ["cdf_ttft"] * 3 + ["cdf_e2el"] * 3]
    fig, axes = figure(mosaic, (15, 8.5), title)

    sweep = any(sum(run["label"] == label for run in runs) >= 2 for label in labels)
    for metric in ("ttft", "tpot"):
        stats = [_latency_stats(run, metric) for run in runs]
        _rate_panel(axes[metric], runs, labels, stats, label_colors, sweep, f"{metric.upper()} (ms)")
        axes[metric].set_title(f"{metric.upper()}: median and tail")
    throughput = [{"": run.get("output_throughput")} for run in runs]
    _rate_panel(axes["tput"], runs, labels, throughput, label_colors, sweep, "output throughput (tok/s)")
    axes["tput"].set_title("output throughput")
    _cdf(axes["cdf_ttft"], runs, run_colors, "ttfts", 1000.0, "TTFT (ms)")
    axes["cdf_ttft"].set_title("TTFT CDF")
    _cdf(axes["cdf_e2el"], runs, run_colors, "e2els", 1.0, "end-to-end latency (s)")
    axes["cdf_e2el"].set_title("end-to-end latency CDF")
    return fig


# ----- decode: step time against the memory-bandwidth floor ----------------------------------------


def _decode_figure(data: dict[str, Any]):
    from matplotlib.ticker import LogFormatter

    results = data.get("results", [])
    engines = list(dict.fromkeys(row["engine"] for row in results))
    bandwidth = data.get("copy_bandwidth_gb_s")
    title = (
        f"decode step: {data.get('model', '?')} ({data.get('dtype', '?')}, context {data.get('context_len')})"
    )
    title += f", copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else ""
    fig, axes = figure([["step", "roofline"]], (12, 4.8), title)
    step_ax, roofline_ax = axes["step"], axes["roofline"]

    max_fraction = 1.0
    for engine in engines:
        rows = sorted((row for row in results if row["engine"] == engine), key=lambda row: row["batch_size"])
        batch_sizes = [row["batch_size"] for row in rows]
        fractions = [row.get("roofline_fraction") or row["floor_ms"] / row["step_ms"] for row in rows]
        max_fraction = max([max_fraction, *fractions])
        step_ax.plot(batch_sizes, [row["step_ms"] for row in rows], "-o", label=engine)
        roofline_ax.plot(batch_sizes, fractions, "-o", label=engine)
    floor = {row["batch_size"]: row["floor_ms"] for row in results if row.get("floor_ms")}
    step_ax.plot(sorted(floor), [floor[b] for b in sorted(floor)], "k--", label="bandwidth floor")
    roofline_ax.axhline(1.0, color="0.5", linestyle=":", linewidth=1)

    batch_sizes = sorted({row["batch_size"] for row in results})
    for ax in (step_ax, roofline_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.legend(fontsize=8)
    step_ax.set_yscale("log")
    step_ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # "20", not "2 x 10^1"
    step_ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    step_ax.set(ylabel="step time (ms)", title="decode step time")
    roofline_ax.set(ylabel="roofline fraction (floor / step)", title="fraction of the bandwidth floor")
    roofline_ax.set_ylim(0, max_fraction * 1.05)
    return fig


# ----- offline: throughput per engine and dtype ----------------------------------------------------


def _offline_figure(data: dict[str, Any]):
    results = data.get("results", [])
    fig, axes = figure(
        [["bars"]], (max(6.0, 1.6 * len(results) + 2), 4.8), f"offline: {data.get('model', '?')}"
    )
    ticks = [f"{row['engine']}\n{row['dtype']}" if row.get("dtype") else row["engine"] for row in results]
    values = []
    for row in results:
        bars = {"output throughput": row.get("throughput_output_tok_s")}
        if row.get("batch1_decode_tok_s") is not None:
            bars["batch-1 decode"] = row["batch1_decode_tok_s"]
        values.append(bars)
    grouped_bars(axes["bars"], ticks, values)
    axes["bars"].set(ylabel="tokens/s", title="output throughput and batch-1 decode")
    return fig


# ----- overload: TTFT and outcomes per priority tier, admission on and off -------------------------


def _overload_figure(data: dict[str, Any]):
    modes = {
        "admission on": data.get("admission_slo") or {},
        "admission off": data.get("admission_off") or {},
    }
    tiers = data.get("tiers") or {}
    fig, axes = figure([["ttft", "outcome"]], (12, 4.8), f"overload: {data.get('model', '?')}")

    ticks = [f"{tier}\n(priority {spec[0]})" for tier, spec in tiers.items()]
    values = []
    for tier in tiers:
        bars = {}
        for mode, result in modes.items():
            for stat in ("p50", "p99"):
                if result.get(tier, {}).get(f"ttft_{stat}_s") is not None:
                    bars[f"{mode} {stat}"] = result[tier][f"ttft_{stat}_s"]
        values.append(bars)
    colors = {"admission on p50": "#9ecae1", "admission on p99": "#3182bd"}
    colors |= {"admission off p50": "#fdae6b", "admission off p99": "#e6550d"}
    grouped_bars(axes["ttft"], ticks, values, colors)
    for i, spec in enumerate(tiers.values()):
        axes["ttft"].hlines(spec[1], i - 0.45, i + 0.45, colors="k", linestyles="--", label="_")
    axes["ttft"].set(ylabel="TTFT (s)", title="TTFT per tier (dashed: SLO)")

    ax = axes["outcome"]
    outcomes = (("met SLO", "tab:green"), ("completed late", "tab:orange"))
    outcomes += (("rejected 429", "0.6"), ("other", "tab:red"))
    for m, (mode, result) in enumerate(modes.items()):
        for i, tier in enumerate(tiers):
            counts = result.get(tier, {})
            sizes = (
                counts.get("met_slo", 0),
                counts.get("completed", 0) - counts.get("met_slo", 0),
                counts.get("rejected_429", 0),
                counts.get("other", 0),
            )
            x, bottom = i + (m - 0.5) * 0.4, 0
            for (name, color), size in zip(outcomes, sizes, strict=True):
                ax.bar(x, size, 0.38, bottom=bottom, color=color, label=name if i == m == 0 else "_")
                bottom += size
            ax.text(x, bottom, mode.split()[-1], ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
    ax.set(ylabel="requests", title="outcome per tier (left: admission on, right: off)")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.08)  # room for the on/off captions
    ax.legend(fontsize=8)
    return fig


PLOTTERS = {
    "serve": _serve_figure,
    "decode": _decode_figure,
    "offline": _offline_figure,
    "overload": _overload_figure,
    "prefill": prefill_figure,
    "startup": startup_figure,
    "offline_scheduling": offline_scheduling_figure,
    "gemv": gemv_figure,
    "decode_split": decode_split_figure,
    "precision_quality": precision_quality_figure,
    "quant_gemv": quant_gemv_figure,
    "spec": spec_figure,
    "kv": kv_figure,
    "kv-decode": kv_decode_figure,
}
