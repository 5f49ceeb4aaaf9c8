"""Figure of `bench spec`: tokens/s and forward passes per token per setting over the batch sweep."""

from __future__ import annotations


def spec_figure(data: dict):
    import matplotlib.pyplot as plt

    rows = data["rows"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, (speed, passes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in settings:
        mine = sorted((r for r in rows if r["setting"] == name), key=lambda r: r["batch_size"])
        batches = [r["batch_size"] for r in mine]
        style = (
            {"linewidth": 2.5, "color": "black"}
            if name == "adaptive"
            else {"linestyle": "--" if name == "off" else "-"}
        )
        speed.plot(batches, [r["tokens_per_s"] for r in mine], marker="o", label=name, **style)
        passes.plot(batches, [r["passes_per_token_per_seq"] for r in mine], marker="o", label=name, **style)
    for ax in (speed, passes):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
    speed.set_ylabel("generated tokens / s")
    speed.set_title("throughput, input-grounded prompts (greedy)")
    passes.set_ylabel("target forward passes per token (per sequence)")
    passes.set_title("forward passes per generated token")
    speed.legend(fontsize=8)
    fig.suptitle(f"speculative decoding — {data.get('model', '')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return fig
