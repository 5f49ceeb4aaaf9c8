"""Plots of the weight-precision benchmarks: quality against float32 (`bench precision`) and the
quantized small-batch GEMV micro-benchmark (scripts/quant_gemv_bench.py)."""

from __future__ import annotations

from typing import Any

from adaptserve.bench.plot_parts import figure, grouped_bars


def precision_quality_figure(result: dict[str, Any]):
    """Bars: agreement with the float32 run per policy, perplexity per format."""
    title = f"Weight precision against float32: {result.get('model', '?')}"
    fig, axes = figure([["agreement", "perplexity"]], (11, 4.2), title)
    rows = dict(result["formats"])
    names = list(rows) + (["adaptive"] if "adaptive" in result else [])
    values = []
    for name in names:
        row = rows.get(name) or result["adaptive"]
        forced = row.get("teacher_forced")
        values.append(
            {
                "teacher-forced": forced["agreement"] * 100 if forced else None,
                "free-running (to 1st divergence)": row["free_running"]["agreement_to_divergence"] * 100,
            }
        )
    grouped_bars(axes["agreement"], names, values, fmt=lambda h: f"{h:.1f}")
    axes["agreement"].set_ylabel("top-1 agreement with float32 (%)")
    axes["agreement"].set_ylim(0, 105)
    grouped_bars(
        axes["perplexity"],
        list(rows),
        [{"perplexity": r["perplexity"]} for r in rows.values()],
        fmt=lambda h: f"{h:.2f}",
    )
    axes["perplexity"].set_ylabel(f"perplexity, {result['settings']['num_text_tokens']} tokens of pydoc text")
    return fig


def quant_gemv_figure(data: dict[str, Any]):
    """Per row count: µs per call of each projection, bf16 against the best fp8 and int4 kernels."""
    records = [r for r in data.get("records", []) if r.get("ok") and r.get("us") is not None]
    records = [r for r in records if r["group_size"] in (None, 128)]
    rows = sorted({r["M"] for r in records})
    shapes = list(dict.fromkeys((r["shape"], r["N"], r["K"]) for r in records))
    title = f"quantized GEMV: µs per call (best config of each kind), {data.get('device', '?')}"
    fig, axes = figure([[f"M={m}" for m in rows]], (6.5 * len(rows) + 1, 5.0), title)
    kinds = {"bf16": "bf16", "fp8_w8a8": "fp8 W8A8", "fp8": "fp8 weight-only", "int4": "int4 g128"}
    colors = {"bf16": "0.6", "fp8 W8A8": "#fdae6b", "fp8 weight-only": "tab:orange", "int4 g128": "tab:green"}
    for m in rows:
        ticks, values = [], []
        for shape, n, k in shapes:
            group = [r for r in records if r["M"] == m and r["shape"] == shape]
            best = {}
            for r in group:
                label = kinds.get(r["kind"])
                if label is not None:
                    best[label] = min(best.get(label, float("inf")), r["us"])
            ticks.append(f"{shape}\n{n}x{k}")
            values.append(best)
        ax = axes[f"M={m}"]
        grouped_bars(ax, ticks, values, colors, fmt=lambda h: f"{h:.0f}")
        ax.set(ylabel="µs per call (lower is better)", title=f"M = {m} rows")
    return fig
