"""Summarise the timelines `spec_profile.py --trace` writes (SPEC_TRACE_DIR/trace-<setting>.json.gz):
per step, when each phase ran, how long the device was busy and where it sat idle; and the device
time per kernel name. Writes one JSON (a record to quote, not a benchmark: the profiler slows the host).

    python scripts/spec_trace_summary.py trace-off.json.gz trace-ngramk4.json.gz --out summary.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from collections import defaultdict

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
RUNTIME_CATEGORIES = ("cuda_runtime", "cuda_driver")


def summarise(path: str, num_steps_shown: int) -> dict:
    with gzip.open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    steps = sorted((e for e in events if e["name"] == "engine.step"), key=lambda e: e["ts"])
    device = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE_CATEGORIES)
    phases = [e for e in events if e.get("cat") == "user_annotation" and e["name"] != "engine.step"]
    runtime = [e for e in events if e.get("cat") in RUNTIME_CATEGORIES]
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in DEVICE_CATEGORIES:
            kernels[e["name"][:80]][0] += 1
            kernels[e["name"][:80]][1] += e["dur"]
    middle = len(steps) // 2
    shown = [_step(s, phases, device, runtime) for s in steps[middle : middle + num_steps_shown]]
    n = max(len(steps), 1)
    return {
        "steps": len(steps),
        "mean_step_us": round(sum(s["dur"] for s in steps) / n, 1),
        "device_us_per_step": round(sum(k[1] for k in kernels.values()) / n, 1),
        "kernels_per_step": {
            name: {"calls": round(c / n, 1), "us": round(t / n, 1)}
            for name, (c, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:15]
        },
        "sample_steps": shown,
    }


def _step(step: dict, phases: list, device: list, runtime: list) -> dict:
    t0, t1 = step["ts"], step["ts"] + step["dur"]
    inside = [(max(a, t0), min(b, t1)) for a, b in device if b > t0 and a < t1]
    busy, end, gaps = 0.0, t0, []
    for a, b in inside:
        if a > end:
            gaps.append([round(end - t0), round(a - t0)])
        if b > end:
            busy += b - max(a, end)
            end = b
    calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in runtime:
        if t0 <= e["ts"] < t1:
            calls[e["name"]][0] += 1
            calls[e["name"]][1] += e["dur"]
    return {
        "us": round(step["dur"]),
        "phases_us": {
            p["name"]: [round(p["ts"] - t0), round(p["ts"] + p["dur"] - t0)]
            for p in sorted((p for p in phases if t0 <= p["ts"] < t1), key=lambda p: p["ts"])
        },
        "device_busy_us": round(busy),
        "device_idle_gaps_over_20us": [g for g in gaps if g[1] - g[0] > 20]
        + ([[round(end - t0), round(t1 - t0)]] if t1 - end > 20 else []),
        "runtime_calls_us": {
            name: [c, round(t)] for name, (c, t) in sorted(calls.items(), key=lambda kv: -kv[1][1])[:8]
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--steps", type=int, default=3, help="steps from the middle of each run to show")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    summary = {os.path.basename(p).removesuffix(".json.gz"): summarise(p, args.steps) for p in args.traces}
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    for name, s in summary.items():
        device_us = s["device_us_per_step"]
        print(f"{name}: {s['steps']} steps, {s['mean_step_us']} us/step, device {device_us} us/step")


if __name__ == "__main__":
    main()
