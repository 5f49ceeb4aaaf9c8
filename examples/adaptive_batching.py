"""The adaptive batching controller's decisions on a bursty trace, beside the load that drove them.

    python examples/adaptive_batching.py                     # ~1 min on a CPU
    python examples/adaptive_batching.py --plot knobs.png    # and the knobs over time, as a plot

One engine on the simulator (the real scheduler, KV bookkeeping and controllers; step times from the
H100 llama-3.1-8b profile in adaptserve/sim/profiles), ShareGPT-shaped requests of which a tenth
have 2k-8k-token prompts, arriving in bursts (on 10 s at 1.6x the mean rate, off 10 s at 0.4x). The
TPOT SLO is tight (30 ms), so a long prefill chunk that costs nothing between bursts breaks the SLO of
every running request during one. The same trace then runs with the engine's static defaults.

Prints a timeline (one line per `--every` seconds: arrivals, running and waiting requests, KV use,
the knobs), every switch with the controller's reason, and goodput under the TTFT + TPOT SLO of both
runs. The controller lives in adaptserve/adapt/batching.py; the whole grid search against it is
scripts/adaptive_vs_static_mixed.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adaptserve.adapt.step_cost import StepCostModel
from adaptserve.bench.arrivals import BurstyArrivals
from adaptserve.bench.workloads import MixedLengthWorkload
from adaptserve.config import EngineConfig
from adaptserve.sim.cli import load_arch
from adaptserve.sim.simulation import Simulation

PROFILE = Path(__file__).parent.parent / "adaptserve/sim/profiles/h100-llama-3.1-8b.json"
MODEL = "llama-3.1-8b"
KV_BLOCKS = 25935  # the H100's at 0.85 of its memory
KNOBS = ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk", "batch_wait_s")


def knob(sample, name: str) -> float:
    """A knob's value at a sample; the prefill chunk as the tokens it allows (0 means the budget)."""
    if name == "prefill_chunk":
        return sample.knobs[name] or sample.knobs["max_num_batched_tokens"]
    return sample.knobs[name]


def run(args, controllers: tuple[str, ...]):
    """(simulation, result) of one run of the trace."""
    cost, arch = StepCostModel.load(PROFILE), load_arch(MODEL)
    workload = MixedLengthWorkload(arch.vocab_size, long_fraction=0.1, long_min_len=2048, long_max_len=8192)
    arrivals = BurstyArrivals(on_rate=1.6 * args.rate, off_rate=0.4 * args.rate, on_s=10.0, off_s=10.0)
    config = EngineConfig.from_flat(
        model=MODEL,
        max_model_len=16384,
        max_num_seqs=256,
        max_num_batched_tokens=4096,
        async_scheduling=False,
        controllers=controllers,
        tpot_slo_s=args.tpot_ms / 1e3,
        ttft_slo_s=args.ttft_ms / 1e3,
        num_blocks=KV_BLOCKS,
    )
    requests = workload.requests(args.num, args.seed)
    simulation = Simulation(requests, arrivals.times(args.num, args.seed), cost, config, arch)
    return simulation, simulation.run({"ttft": args.ttft_ms, "tpot": args.tpot_ms})


def print_timeline(simulation, samples, every: float) -> None:
    switches = simulation.replicas[0].engine.control.switches.recent
    print(
        f"{'t (s)':>6} {'arr/s':>6} {'run':>4} {'wait':>5} {'KV':>5} | " + " ".join(f"{k:>22}" for k in KNOBS)
    )
    next_t = 0.0
    for sample in samples:
        if sample.time + 1e-9 < next_t:
            continue
        next_t = sample.time + every
        knobs = " ".join(f"{knob(sample, k):>22g}" for k in KNOBS)
        print(
            f"{sample.time:6.0f} {sample.arrival_rate:6.1f} {sample.num_running:4d} {sample.num_waiting:5d} "
            f"{sample.kv_usage:5.0%} | {knobs}"
        )
    print(f"\n{len(switches)} switches (knob: old -> new, by whom, why; a prefill chunk of 0 is the budget):")
    for switch in switches[:40]:
        print(
            f"  t={switch.time:6.2f}s {switch.knob}: {switch.old} -> {switch.new} "
            f"({switch.controller}: {switch.reason})"
        )
    if len(switches) > 40:
        print(f"  ... and {len(switches) - 40} more")


def plot(samples, switches, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [s.time for s in samples]
    shown = KNOBS[:3]  # batch_wait_s stays 0 on this trace
    fig, axes = plt.subplots(len(shown) + 1, 1, figsize=(11, 8), sharex=True)
    axes[0].plot(times, [s.arrival_rate for s in samples], color="tab:gray", label="arrivals/s")
    axes[0].plot(times, [s.num_running for s in samples], color="tab:blue", label="running")
    axes[0].plot(times, [s.num_waiting for s in samples], color="tab:red", label="waiting")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_title("load, and the batching controller's knobs (simulated H100, llama-3.1-8b)")
    for ax, name in zip(axes[1:], shown, strict=True):
        ax.step(times, [knob(s, name) for s in samples], where="post", color="tab:green")
        ax.set_ylabel(name, fontsize=8)
        for switch in switches:
            if switch.knob == name:
                ax.axvline(switch.time, color="tab:orange", alpha=0.25, linewidth=0.8)
    axes[-1].set_xlabel("simulated seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=22.0, help="mean arrivals per second")
    parser.add_argument("--num", type=int, default=900, help="requests (900 at 22/s: two on/off cycles)")
    parser.add_argument("--ttft-ms", type=float, default=2000.0)
    parser.add_argument("--tpot-ms", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between timeline lines")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", default="", help="write the knobs over time to this PNG")
    args = parser.parse_args()
    simulation, adaptive = run(args, ("batching",))
    samples = adaptive.time_series[0]
    print_timeline(simulation, samples, args.every)
    _, static = run(args, ())
    print(f"\ngoodput under TTFT {args.ttft_ms:g} ms + TPOT {args.tpot_ms:g} ms (requests/s):")
    for name, result in (
        ("adaptive batching", adaptive),
        ("static defaults (256 seqs / 4096 tokens)", static),
    ):
        m = result.metrics
        print(
            f"  {name:>40}: {m['request_goodput']:6.2f} of {m['request_throughput']:6.2f}, "
            f"p90 TPOT {m['p90_tpot_ms']:5.1f} ms, p90 TTFT {m['p90_ttft_ms']:6.0f} ms"
        )
    if args.plot:
        plot(samples, simulation.replicas[0].engine.control.switches.recent, args.plot)


if __name__ == "__main__":
    main()
