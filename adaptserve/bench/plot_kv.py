"""Figure of `bench kv`: the load ramp (KV usage and the write format step by step, static bf16 against
the adaptive policy), its outcome per setting, and the quality and capacity of each format."""

from __future__ import annotations

_FORMAT_COLORS = {"bf16": "white", "fp8": "#fde0c5", "int8": "#cfe3f5", "int4": "#f5cfd6"}


def kv_figure(data: dict):
    import matplotlib.pyplot as plt

    ramp, quality, capacity = data.get("ramp"), data.get("quality"), data.get("capacity")
    panels = [p for p in ("timeline", "outcome", "quality", "capacity") if _has(p, ramp, quality, capacity)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 4.2))
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, panel in zip(axes, panels, strict=False):
        {"timeline": _timeline, "outcome": _outcome, "quality": _quality, "capacity": _capacity}[panel](
            ax, ramp, quality, capacity
        )
    fig.suptitle(f"KV-cache compression — {data.get('model', '')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    return fig


def _has(panel, ramp, quality, capacity) -> bool:
    return {"timeline": ramp, "outcome": ramp, "quality": quality, "capacity": capacity}[panel] is not None


def _timeline(ax, ramp, _quality, _capacity) -> None:
    for name, row in ramp["rows"].items():
        ax.plot(row["timeline"]["kv_usage"], label=f"{name}: KV use")
        if name != "bf16":
            formats = row["timeline"]["kv_format"]
            for step, fmt in enumerate(formats):
                ax.axvspan(step, step + 1, color=_FORMAT_COLORS.get(fmt, "white"), alpha=0.6, linewidth=0)
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV memory in use (share)")
    ax.set_title("load ramp: shading = adaptive write format\n(blue int8, pink int4)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _outcome(ax, ramp, _quality, _capacity) -> None:
    names = list(ramp["rows"])
    metrics = ("preemptions", "mean_ttft_steps", "peak_running")
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        row = ramp["rows"][name]
        ax.bar([m + i * width for m in range(len(metrics))], [row[k] for k in metrics], width, label=name)
    ax.set_xticks([m + width * (len(names) - 1) / 2 for m in range(len(metrics))])
    ax.set_xticklabels(["preemptions", "mean TTFT (steps)", "peak running"], fontsize=8)
    ax.set_title(
        "load ramp outcome (none lost in any setting)"
        if all(r["lost"] == 0 for r in ramp["rows"].values())
        else "load ramp outcome",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def _quality(ax, _ramp, quality, _capacity) -> None:
    rows = quality["formats"]
    names = list(rows)
    ax.bar(names, [rows[n]["teacher_forced"]["agreement"] for n in names], color="#4c72b0")
    ax.set_ylim(min(0.9, min(rows[n]["teacher_forced"]["agreement"] for n in names) - 0.02), 1.0)
    ax.set_ylabel("teacher-forced top-1 agreement with bf16 KV")
    for i, n in enumerate(names):
        ax.annotate(
            f"ppl {rows[n]['perplexity']:.2f}",
            (i, ax.get_ylim()[0]),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_title("quality per KV format (chunked scoring)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")


def _capacity(ax, _ramp, _quality, capacity) -> None:
    rows = capacity["formats"]
    names = list(rows)
    ax.bar(names, [rows[n]["peak_running"] for n in names], color="#55a868")
    for i, n in enumerate(names):
        ax.annotate(
            f"{rows[n]['saturated_vs_bf16']:.2f}x",
            (i, rows[n]["peak_running"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel("peak sequences running")
    ax.set_title("capacity at one KV budget\n(label: mean running while saturated, vs bf16)", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(alpha=0.3, axis="y")


def kv_decode_figure(data: dict):
    """`kv-decode` (scripts/kv_decode_gpu.sh, then scripts/kv_decode_combine.py): one decode step's
    median time per batch size, one bar per KV setting (plain cache, compressed with and without
    CUDA graphs, ...)."""
    import matplotlib.pyplot as plt

    from adaptserve.bench.plot_parts import grouped_bars

    settings = data["settings"]  # name -> {"flags", "results": [{"batch_size", "step_ms", ...}]}
    batches = sorted({r["batch_size"] for s in settings.values() for r in s["results"]})
    values = [
        {
            name: next((r["step_ms"] for r in s["results"] if r["batch_size"] == b), None)
            for name, s in settings.items()
        }
        for b in batches
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    grouped_bars(ax, [f"batch {b}" for b in batches], values, fmt=lambda h: f"{h:.1f}")
    ax.set_ylabel("decode step, ms (median)")
    ax.set_title(f"KV settings, {data.get('model', '')}, context {data.get('context_len', '?')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig
