"""Plots of the adaptive-vs-static runs: goodput of every static setting against the adaptive engine
(simulator at 8 replicas, and for real on the H100), and the adaptive run's knobs over time beside load.

Usage: python scripts/plot_control.py  (reads docs/benchmarks/adaptive-vs-static-sim.json and
control-gpu-h100.json, writes docs/benchmarks/adaptive-vs-static.png)"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).parent.parent / "docs/benchmarks"


def _label(knobs: dict) -> str:
    return f"{knobs['max_num_seqs']}/{knobs['max_num_batched_tokens']}"


def main() -> None:
    sim = json.loads((DOCS / "adaptive-vs-static-sim.json").read_text())
    gpu = json.loads((DOCS / "control-gpu-h100.json").read_text())
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    for col, kind in enumerate(("bursty", "diurnal")):
        ax = axes[0][col]
        static = sim[kind]["static"]
        labels = [_label(s["knobs"]) for s in static] + ["adaptive"]
        values = [s["request_goodput"] for s in static] + [sim[kind]["adaptive"]["request_goodput"]]
        colors = ["tab:gray"] * len(static) + ["tab:green"]
        ax.bar(labels, values, color=colors)
        real = gpu["claim"][kind]
        for s in real["real_static"]:
            ax.scatter(_label(s["knobs"]), s["request_goodput"] * sim["replicas"], color="tab:blue", zorder=3)
        ax.scatter("adaptive", real["real_adaptive"]["request_goodput"] * sim["replicas"], color="tab:blue",
                   zorder=3, label=f"real H100 x{sim['replicas']} (one GPU's goodput scaled)")  # fmt: skip
        ax.set_title(f"{kind}: goodput, simulator at {sim['replicas']} replicas (bars)")
        ax.set_xlabel("static max_num_seqs / token budget")
        ax.set_ylabel("requests/s meeting TTFT 2 s and TPOT 50 ms")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(loc="lower right", fontsize=8)
        series = sim[kind]["adaptive"].get("time_series") or []
        ax = axes[1][col]
        if series:
            t = [p["time"] for p in series]
            ax.plot(t, [p["arrival_rate"] for p in series], color="tab:gray", label="arrivals/s (replica 0)")
            ax.plot(t, [p["num_running"] for p in series], color="tab:orange", label="running")
            ax.set_xlabel("simulated seconds")
            twin = ax.twinx()
            twin.plot(t, [p["knobs"]["max_num_batched_tokens"] for p in series], color="tab:green",
                      label="token budget")  # fmt: skip
            twin.plot(
                t, [p["knobs"]["max_num_seqs"] for p in series], color="tab:purple", label="max_num_seqs"
            )
            twin.set_ylabel("knob value")
            ax.legend(loc="upper left", fontsize=8)
            twin.legend(loc="upper right", fontsize=8)
            ax.set_title(f"{kind}: adaptive knobs over time beside load (replica 0)")
    fig.tight_layout()
    fig.savefig(DOCS / "adaptive-vs-static.png", dpi=110)
    print("wrote", DOCS / "adaptive-vs-static.png")


if __name__ == "__main__":
    main()
