"""Figure helpers shared by the benchmark plots (matplotlib is imported only when one is drawn)."""

from __future__ import annotations

import math


def figure(mosaic: list[list[str]], figsize: tuple[float, float], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    fig.get_layout_engine().set(rect=(0, 0.03, 1, 0.97))  # leave the bottom strip to the footnote
    fig.suptitle(title)
    return fig, fig.subplot_mosaic(mosaic)


def grouped_bars(
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
