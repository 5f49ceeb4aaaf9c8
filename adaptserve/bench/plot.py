"""`adaptserve bench plot`: one PNG per benchmark JSON under docs/benchmarks/.

Each benchmark kind ("serve", "decode", "offline", "overload", "prefill", "startup",
"offline_scheduling", and the kernel sweeps "gemv" and "decode_split") has one function that draws
its panels; `plot_file` dispatches on the JSON's "benchmark" key, adds a footnote with device, date and
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

RESULTS_DIR = Path("docs/benchmarks")
# One colour map per serve label; a label's runs get darker shades as the request rate rises.
LABEL_CMAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
DEFAULT_GEMM_TFLOPS = 770.0  # bf16 GEMM measured on the H100 (as bench prefill's default peak)
STARTUP_TARGET_S = 10.0  # start to ready to serve, weights excluded
OFFLINE_TARGET_REQ_S = 45.0  # offline request throughput, llama-3.1-8b on one H100


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


def _figure(mosaic: list[list[str]], figsize: tuple[float, float], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    fig.get_layout_engine().set(rect=(0, 0.03, 1, 0.97))  # leave the bottom strip to the footnote
    fig.suptitle(title)
    return fig, fig.subplot_mosaic(mosaic)


def _grouped_bars(
    ax, tick_labels: list[str], values: list[dict[str, float | None]], colors=None, fmt=lambda h: f"{h:.3g}"
) -> dict[str, list[float]]:
    """One group of bars per tick; one bar per series name found in `values` (missing ones left out);
    `fmt` writes each bar's label from its height. Returns each series' bar positions."""
    names = list(dict.fromkeys(name for row in values for name in row))
    width = 0.8 / max(1, len(names))
    positions = {}
    for j, name in enumerate(names):
        heights = [row.get(name) for row in values]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(values))]
        nan_heights = [h if h is not None else math.nan for h in heights]
        bars = ax.bar(xs, nan_heights, width, label=name, color=(colors or {}).get(name))
        ax.bar_label(bars, [fmt(h) if h is not None else "" for h in heights], fontsize=7)
        positions[name] = xs
    ax.set_xticks(range(len(tick_labels)), tick_labels, fontsize=8)
    if any(names):
        ax.legend(fontsize=8)
    return positions


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
        _grouped_bars(ax, [_run_name(run, "\n") for run in runs], values)
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
    fig, axes = _figure(mosaic, (15, 8.5), title)

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
    fig, axes = _figure([["step", "roofline"]], (12, 4.8), title)
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
    fig, axes = _figure(
        [["bars"]], (max(6.0, 1.6 * len(results) + 2), 4.8), f"offline: {data.get('model', '?')}"
    )
    ticks = [f"{row['engine']}\n{row['dtype']}" if row.get("dtype") else row["engine"] for row in results]
    values = []
    for row in results:
        bars = {"output throughput": row.get("throughput_output_tok_s")}
        if row.get("batch1_decode_tok_s") is not None:
            bars["batch-1 decode"] = row["batch1_decode_tok_s"]
        values.append(bars)
    _grouped_bars(axes["bars"], ticks, values)
    axes["bars"].set(ylabel="tokens/s", title="output throughput and batch-1 decode")
    return fig


# ----- overload: TTFT and outcomes per priority tier, admission on and off -------------------------


def _overload_figure(data: dict[str, Any]):
    modes = {
        "admission on": data.get("admission_slo") or {},
        "admission off": data.get("admission_off") or {},
    }
    tiers = data.get("tiers") or {}
    fig, axes = _figure([["ttft", "outcome"]], (12, 4.8), f"overload: {data.get('model', '?')}")

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
    _grouped_bars(axes["ttft"], ticks, values, colors)
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


# ----- prefill: TFLOP/s of one long prompt against the GEMM rate -----------------------------------


def _prefill_figure(data: dict[str, Any]):
    results = data.get("results", [])
    gemm = data.get("peak_tflops") or DEFAULT_GEMM_TFLOPS
    lengths = sorted({row["prompt_len"] for row in results})
    title = f"prefill: {data.get('model', '?')} ({data.get('dtype', '?')}), one prompt per step"
    fig, axes = _figure([["bars"]], (max(6.0, 2.4 * len(lengths) + 2), 4.8), title)
    ax = axes["bars"]
    values = [
        {row["engine"]: row.get("tflops") for row in results if row["prompt_len"] == n} for n in lengths
    ]
    _grouped_bars(ax, [f"{n} tokens" for n in lengths], values, fmt=lambda h: f"{h:.0f} ({h / gemm:.0%})")
    ax.axhline(gemm, color="k", linestyle="--", linewidth=1, label=f"bf16 GEMM {gemm:g} TFLOP/s")
    ax.set_ylim(0, gemm * 1.15)
    ax.set(xlabel="prompt length", ylabel="TFLOP/s", title="prefill TFLOP/s (in brackets: share of GEMM)")
    ax.legend(fontsize=8, loc="lower right")
    return fig


# ----- startup: seconds from process start to ready, by phase --------------------------------------

# What the child process times itself; every other entry of phases_s is a part of "engine".
STARTUP_TOP_PHASES = ("imports", "checkpoint", "engine")
STARTUP_WEIGHT_PHASES = ("checkpoint", "weights")  # putting the weights in memory: not in the target


def _startup_segments(row: dict[str, Any]) -> list[tuple[str, float]]:
    """A run's phases as disjoint (name, seconds) summing to total_s: those the target counts first,
    the weight phases last, so the counted ones end at ready_s."""
    phases = {
        name: seconds
        for name, seconds in (row.get("phases_s") or {}).items()
        if name != "graphs_captured" and isinstance(seconds, (int, float))
    }
    top = {name: phases.pop(name, 0.0) for name in STARTUP_TOP_PHASES}
    segments = [("interpreter start", row["total_s"] - sum(top.values())), ("imports", top["imports"])]
    segments += [(name, s) for name, s in phases.items() if name not in STARTUP_WEIGHT_PHASES]
    segments.append(("engine, other", top["engine"] - sum(phases.values())))
    segments += [("checkpoint", top["checkpoint"]), ("weights", phases.get("weights", 0.0))]
    return [(name, max(0.0, seconds)) for name, seconds in segments]


def _startup_figure(data: dict[str, Any]):
    from matplotlib import colormaps

    results = data.get("results", [])
    segments = [_startup_segments(row) for row in results]
    names = list(dict.fromkeys(name for row in segments for name, _ in row))
    colors = {name: colormaps["tab10"](i % 10) for i, name in enumerate(names)}
    title = f"startup: {data.get('model', '?')}, process start to ready to serve"
    fig, axes = _figure([["bars"]], (12, 1.0 * len(results) + 2.6), title)
    ax = axes["bars"]
    for y, (row, row_segments) in enumerate(zip(results, segments, strict=True)):
        left = 0.0
        for name, seconds in row_segments:
            weights = name in STARTUP_WEIGHT_PHASES
            style = {"alpha": 0.4, "hatch": "//"} if weights else {}
            ax.barh(y, seconds, 0.6, left=left, color=colors[name], label=name if y == 0 else "_", **style)
            if seconds >= 0.6:  # wide enough to carry its seconds
                ax.text(left + seconds / 2, y, f"{seconds:.1f}", ha="center", va="center", fontsize=7)
            left += seconds
        ready = row.get("ready_s", left)
        ax.text(left, y, f"  ready {ready:.1f} s (total {row['total_s']:.1f} s)", va="center", fontsize=8)
    ax.axvline(STARTUP_TARGET_S, color="k", linestyle="--", label=f"target: ready in {STARTUP_TARGET_S:g} s")
    ticks = [f"run {row.get('run', i)}" for i, row in enumerate(results)]
    graphs = [(row.get("phases_s") or {}).get("graphs_captured") for row in results]
    ticks = [
        f"{tick}\n{num} graphs" if num is not None else tick for tick, num in zip(ticks, graphs, strict=True)
    ]
    ax.set_yticks(range(len(results)), ticks, fontsize=8)
    ax.set_ylim(len(results) - 0.5, -0.5)  # run 0 on top
    ax.set_xlim(0, max([STARTUP_TARGET_S, *(row["total_s"] for row in results)]) * 1.3)
    ax.set(
        xlabel="seconds from process start", title="phases (hatched: weights, which the target leaves out)"
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


# ----- offline_scheduling: request throughput per scheduling setting --------------------------------


def _offline_scheduling_figure(data: dict[str, Any]):
    runs = data.get("runs", [])
    workload = data.get("workload") or {}
    title = f"offline scheduling: {data.get('model', '?')}, workload {workload.get('name', '?')}"
    title += f", {workload['num_prompts']} prompts" if workload.get("num_prompts") else ""
    fig, axes = _figure([["bars"]], (max(8.0, 1.8 * len(runs) + 2), 4.8), title)
    ax = axes["bars"]
    ticks = [
        f"async {run.get('async_scheduling', '?')}\nmax_num_seqs {run.get('max_num_seqs', '?')}"
        for run in runs
    ]
    values = [
        {row["engine"]: row.get("request_throughput") for row in run.get("results", [])} for run in runs
    ]
    xs = _grouped_bars(ax, ticks, values)
    width = 0.8 / max(1, len(xs))  # as _grouped_bars draws them: dots go right of each bar's label
    rounds = False
    for i, run in enumerate(runs):
        for row in run.get("results", []):
            samples = row.get("elapsed_samples") or []
            if len(samples) > 1 and row.get("num_prompts"):  # a dot per round where there were several
                ys = [row["num_prompts"] / s for s in samples]
                ax.scatter(
                    [xs[row["engine"]][i] + 0.3 * width] * len(ys),
                    ys,
                    s=14,
                    color="k",
                    zorder=3,
                    label="_" if rounds else "each round",
                )
                rounds = True
    ax.axhline(
        OFFLINE_TARGET_REQ_S,
        color="k",
        linestyle="--",
        linewidth=1,
        label=f"target {OFFLINE_TARGET_REQ_S:g} req/s",
    )
    top = max([OFFLINE_TARGET_REQ_S, *(v for row in values for v in row.values() if v is not None)])
    ax.set_ylim(0, top * 1.2)
    ax.set(ylabel="requests/s", title="request throughput per run (dashed: target)")
    ax.legend(fontsize=8, loc="lower right")
    return fig


# ----- gemv: achieved bandwidth of cuBLAS and the Triton configs per projection --------------------


def _gemv_bars(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """cuBLAS, the best Triton config and the one the autotuner picked, in TB/s, for one shape and M."""
    triton = [r for r in records if r["impl"] != "cublas"]
    best = max(triton, key=lambda r: r["tbps"], default=None)
    return {
        "cuBLAS": next((r["tbps"] for r in records if r["impl"] == "cublas"), None),
        "Triton best": best["tbps"] if best else None,
        "Triton picked": next((r["tbps"] for r in triton if r.get("picked")), None),
    }


def _gemv_figure(data: dict[str, Any]):
    records = [r for r in data.get("records", []) if r.get("ok", True) and r.get("tbps") is not None]
    rows = sorted({r["M"] for r in records})
    shapes = list(dict.fromkeys((r["shape"], r["K"], r["N"]) for r in records))
    title = "gemv (bf16 weights): achieved bandwidth, cuBLAS against Triton configs"
    fig, axes = _figure([[f"M={m}" for m in rows]], (7.0 * len(rows) + 1, 5.2), title)
    colors = {"cuBLAS": "0.6", "Triton best": "tab:blue", "Triton picked": "#9ecae1"}
    for m in rows:
        ticks, values = [], []
        for shape, k, n in shapes:
            group = [r for r in records if r["M"] == m and r["shape"] == shape]
            best = max((r for r in group if r["impl"] != "cublas"), key=lambda r: r["tbps"], default=None)
            words = best["impl"].split() if best else []  # "fma n2 k2048 s1 w4 st1"
            ticks.append(
                f"{shape}\n{k}x{n}" + (f"\nbest {' '.join(words[:3])}\n{' '.join(words[3:])}" if best else "")
            )
            values.append(_gemv_bars(group))
        ax = axes[f"M={m}"]
        _grouped_bars(ax, ticks, values, colors, fmt=lambda h: f"{h:.2f}")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        ax.set(ylabel="TB/s", title=f"M = {m} (K x N weight)")
    return fig


# ----- decode_split: split-K decode attention, best time per split count ---------------------------


def _decode_split_figure(data: dict[str, Any]):
    from matplotlib.ticker import LogFormatter

    best: dict[int, dict[int, float]] = {}  # batch -> splits -> fastest µs over the tile configs
    for r in data.get("records", []):
        if r.get("us") is not None:
            per_split = best.setdefault(r["batch"], {})
            per_split[r["splits"]] = min(per_split.get(r["splits"], math.inf), r["us"])
    title = f"decode attention split-K sweep: context {data.get('context_len', '?')}"
    fig, axes = _figure([["lines"]], (8.0, 5.0), title)
    ax = axes["lines"]
    for batch in sorted(best):
        splits = sorted(best[batch])
        (line,) = ax.plot(splits, [best[batch][s] for s in splits], "-o", label=f"batch {batch}")
        fastest = min(splits, key=best[batch].get)
        us = best[batch][fastest]
        ax.scatter([fastest], [us], s=160, facecolors="none", edgecolors=line.get_color(), linewidths=1.5)
        ax.annotate(
            f"{us:.3g} µs",
            (fastest, us),
            xytext=(0, -16),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    all_us = [us for per_split in best.values() for us in per_split.values()]
    all_splits = sorted({s for per_split in best.values() for s in per_split})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_splits, [str(s) for s in all_splits])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    if all_us:
        ax.set_ylim(min(all_us) / 1.3, max(all_us) * 1.15)  # room for the labels under the rings
    ax.set(
        xlabel="KV splits", ylabel="µs (fastest tile config)", title="best time per split count (○ = fastest)"
    )
    ax.legend(fontsize=8)
    return fig


PLOTTERS = {
    "serve": _serve_figure,
    "decode": _decode_figure,
    "offline": _offline_figure,
    "overload": _overload_figure,
    "prefill": _prefill_figure,
    "startup": _startup_figure,
    "offline_scheduling": _offline_scheduling_figure,
    "gemv": _gemv_figure,
    "decode_split": _decode_split_figure,
}
