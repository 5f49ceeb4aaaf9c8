"""Plots of the GPU fast path's benchmarks: prefill, start-up, offline scheduling runs, and the kernel
sweeps (single-row GEMV configs, decode split counts)."""

from __future__ import annotations

import math
from typing import Any

from adaptserve.bench.plot_parts import figure, grouped_bars

DEFAULT_GEMM_TFLOPS = 770.0  # bf16 GEMM measured on the H100 (as bench prefill's default peak)
STARTUP_TARGET_S = 10.0  # start to ready to serve, weights excluded
OFFLINE_TARGET_REQ_S = 45.0  # offline request throughput, llama-3.1-8b on one H100


# ----- prefill: TFLOP/s of one long prompt against the GEMM rate -----------------------------------


def prefill_figure(data: dict[str, Any]):
    results = data.get("results", [])
    gemm = data.get("peak_tflops") or DEFAULT_GEMM_TFLOPS
    lengths = sorted({row["prompt_len"] for row in results})
    title = f"prefill: {data.get('model', '?')} ({data.get('dtype', '?')}), one prompt per step"
    fig, axes = figure([["bars"]], (max(6.0, 2.4 * len(lengths) + 2), 4.8), title)
    ax = axes["bars"]
    values = [
        {row["engine"]: row.get("tflops") for row in results if row["prompt_len"] == n} for n in lengths
    ]
    grouped_bars(ax, [f"{n} tokens" for n in lengths], values, fmt=lambda h: f"{h:.0f} ({h / gemm:.0%})")
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


def startup_figure(data: dict[str, Any]):
    from matplotlib import colormaps

    results = data.get("results", [])
    segments = [_startup_segments(row) for row in results]
    names = list(dict.fromkeys(name for row in segments for name, _ in row))
    colors = {name: colormaps["tab10"](i % 10) for i, name in enumerate(names)}
    title = f"startup: {data.get('model', '?')}, process start to ready to serve"
    fig, axes = figure([["bars"]], (12, 1.0 * len(results) + 2.6), title)
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


def offline_scheduling_figure(data: dict[str, Any]):
    runs = data.get("runs", [])
    workload = data.get("workload") or {}
    title = f"offline scheduling: {data.get('model', '?')}, workload {workload.get('name', '?')}"
    title += f", {workload['num_prompts']} prompts" if workload.get("num_prompts") else ""
    fig, axes = figure([["bars"]], (max(8.0, 1.8 * len(runs) + 2), 4.8), title)
    ax = axes["bars"]
    ticks = [
        f"async {run.get('async_scheduling', '?')}\nmax_num_seqs {run.get('max_num_seqs', '?')}"
        for run in runs
    ]
    values = [
        {row["engine"]: row.get("request_throughput") for row in run.get("results", [])} for run in runs
    ]
    xs = grouped_bars(ax, ticks, values)
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


def gemv_figure(data: dict[str, Any]):
    records = [r for r in data.get("records", []) if r.get("ok", True) and r.get("tbps") is not None]
    rows = sorted({r["M"] for r in records})
    shapes = list(dict.fromkeys((r["shape"], r["K"], r["N"]) for r in records))
    title = "gemv (bf16 weights): achieved bandwidth, cuBLAS against Triton configs"
    fig, axes = figure([[f"M={m}" for m in rows]], (7.0 * len(rows) + 1, 5.2), title)
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
        grouped_bars(ax, ticks, values, colors, fmt=lambda h: f"{h:.2f}")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        ax.set(ylabel="TB/s", title=f"M = {m} (K x N weight)")
    return fig


# ----- decode_split: split-K decode attention, best time per split count ---------------------------


def decode_split_figure(data: dict[str, Any]):
    from matplotlib.ticker import LogFormatter

    best: dict[int, dict[int, float]] = {}  # batch -> splits -> fastest µs over the tile configs
    for r in data.get("records", []):
        if r.get("us") is not None:
            per_split = best.setdefault(r["batch"], {})
            per_split[r["splits"]] = min(per_split.get(r["splits"], math.inf), r["us"])
    title = f"decode attention split-K sweep: context {data.get('context_len', '?')}"
    fig, axes = figure([["lines"]], (8.0, 5.0), title)
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
