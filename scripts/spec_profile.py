"""Where a speculative step's time goes on the host and on the device (issue 9, batch 1 on the GPU).

Times each phase of the engine's step (drafting, scheduling, launch, the wait for tokens, finishing)
with wall-clock accumulators, for plain decoding and for fixed n-gram speculation, and the device
time of one decode-graph replay per batch bucket. Prints one table per setting; no JSON (a tool for
finding overhead, not a benchmark).

    python scripts/spec_profile.py --model smollm2-135m --dtype float32 --batch 1
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import time
from collections import defaultdict

import torch

from adaptserve import LLM, SamplingParams
from adaptserve.bench.spec import grounded_conversations
from adaptserve.model.loaders import load_checkpoint

PHASES = {
    "engine.step": ("adaptserve.engine.engine", "LLMEngine", "step"),
    "propose_drafts": ("adaptserve.engine.engine", "LLMEngine", "_propose_drafts"),
    "schedule": ("adaptserve.engine.scheduler", "Scheduler", "schedule"),
    "runner.launch": ("adaptserve.runner.model_runner", "ModelRunner", "launch"),
    "build_host_batch": ("adaptserve.runner.model_runner", None, "build_host_batch"),
    "graph.run": ("adaptserve.runner.cuda_graphs", "DecodeGraphPool", "run"),
    "verify(runner)": ("adaptserve.runner.model_runner", "ModelRunner", "_verify"),
    "result(wait)": ("adaptserve.runner.launched_step", "LaunchedStep", "result"),
    "finish": ("adaptserve.engine.engine", "LLMEngine", "_finish"),
    "resolve": ("adaptserve.engine.scheduler", "Scheduler", "resolve"),
}


def instrument(totals: dict[str, float], counts: dict[str, int]) -> None:
    import importlib

    for name, (module_name, class_name, attr) in PHASES.items():
        module = importlib.import_module(module_name)
        owner = getattr(module, class_name) if class_name else module
        if not hasattr(owner, attr):
            print(f"skip {name}: {module_name}.{class_name}.{attr} not found")
            continue
        original = getattr(owner, attr)

        def timed(*args, __original=original, __name=name, **kwargs):
            start = time.perf_counter()
            try:
                with torch.profiler.record_function(__name):  # a named range in --trace's timeline
                    return __original(*args, **kwargs)
            finally:
                totals[__name] += time.perf_counter() - start
                counts[__name] += 1

        setattr(owner, attr, timed)


class GraphDeviceSpan:
    """Without the profiler: CUDA events around each DecodeGraphPool.run. The first is reached at
    once when the device is idle; the second when the graph has run. Their gap less the graph's own
    replay time is how long the device waited for the host to finish launching (verify steps)."""

    def __init__(self):
        self.pairs: list = []

    def install(self) -> None:
        from adaptserve.runner.cuda_graphs import DecodeGraphPool

        original = DecodeGraphPool.run

        def run(pool, *args, **kwargs):
            if not torch.cuda.is_available():
                return original(pool, *args, **kwargs)
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record()
            hidden = original(pool, *args, **kwargs)
            after.record()
            self.pairs.append((len(args[0].sequences), before, after))
            return hidden

        DecodeGraphPool.run = run

    def report(self) -> dict[int, float]:
        """Mean ms from the first event to the second, by rows in the step."""
        if not self.pairs:
            return {}
        torch.cuda.synchronize()
        spans: dict[int, list[float]] = defaultdict(list)
        for rows, before, after in self.pairs:
            spans[rows].append(before.elapsed_time(after))
        self.pairs.clear()
        return {rows: round(sum(v) / len(v), 4) for rows, v in sorted(spans.items())}


class Recorder:
    def __init__(self, steps: list):
        self.steps = steps

    def record(self, stats) -> None:
        self.steps.append(stats)


def graph_replay_ms(llm) -> dict[int, float]:
    graphs = llm.engine.runner.graphs
    if graphs is None:
        return {}
    result = {}
    for key, graph in list(graphs.graphs.items()):
        size = key[0]
        if size > 16 or size in result:
            continue
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            graph.replay()
        torch.cuda.synchronize()
        result[size] = round((time.perf_counter() - start) / 50 * 1e3, 4)
    return result


def device_trace(run, num_steps: int, name: str) -> None:
    """One more pass under torch.profiler: the device's busy time (union of kernel and copy
    intervals) against the wall time, and the host's CUDA runtime calls, per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    device = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    busy, end = 0.0, float("-inf")
    for lo, hi in device:
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    print(
        f"  trace: wall {wall * 1e3 / num_steps:.3f} ms/step, device busy "
        f"{busy / 1e3 / num_steps:.3f} ms/step ({len(device) / num_steps:.0f} device events/step)"
    )
    if os.environ.get("SPEC_TRACE_DIR"):  # the whole timeline, for chrome://tracing or perfetto
        path = os.path.join(
            os.environ["SPEC_TRACE_DIR"], f"trace-{name.replace(' ', '').replace('=', '')}.json"
        )
        prof.export_chrome_trace(path)
        subprocess.run(["gzip", "-f", path], check=False)
    rows = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:25]
    for a in rows:
        print(
            f"    {a.key[:60]:<60} {a.count / num_steps:6.1f}/step  self cpu "
            f"{a.self_cpu_time_total / 1e3 / num_steps:7.3f} ms/step  device "
            f"{a.self_device_time_total / 1e3 / num_steps:7.3f} ms/step"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", default="4")
    parser.add_argument("--cprofile", type=int, default=0, help="print this many functions by own time")
    parser.add_argument(
        "--trace", action="store_true", help="torch.profiler: device busy time, idle gaps, CUDA API calls"
    )
    parser.add_argument(
        "--graph-pieces", default="1", help="kernels.cuda_graph_pieces values to compare, e.g. 1,3"
    )
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.model, progress=False)
    conversations = grounded_conversations(args.batch)
    if checkpoint.tokenizer is None:  # a preset: token ids straight away
        prompts = [list(range(100 + i, 200 + i)) * 2 for i in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    base = [("off", {})] + [
        (f"ngram k={k}", {"spec_method": "ngram", "spec_adaptive": False, "num_speculative_tokens": int(k)})
        for k in args.k.split(",")
    ]
    pieces = [int(p) for p in args.graph_pieces.split(",")]
    settings = [
        (name if len(pieces) == 1 else f"{name} pieces={p}", {**options, "cuda_graph_pieces": p})
        for p in pieces
        for name, options in base
    ]
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    instrument(totals, counts)
    spans = GraphDeviceSpan()
    spans.install()
    summary = []  # (setting, ms/step, tok/s): printed last, so a tail of the output keeps every row
    for name, options in settings:
        memory = {"kv_cache_memory_gib": 4.0} if torch.cuda.is_available() else {}
        llm = LLM.from_checkpoint(checkpoint, max_num_seqs=64, dtype=args.dtype, **memory, **options)

        def run(llm=llm):
            if checkpoint.tokenizer is None:
                return llm.generate(prompts, params, use_tqdm=False)
            return llm.chat(conversations, params, use_tqdm=False)

        run()
        run()
        totals.clear()
        counts.clear()
        spans.report()  # drops the warm-up passes' spans
        steps = []
        llm.engine.stat_loggers.append(Recorder(steps))
        profiler = cProfile.Profile() if args.cprofile else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        run()
        if profiler is not None:
            profiler.disable()
        wall = time.perf_counter() - start
        num_steps = sum(1 for s in steps if s.num_scheduled_tokens)
        tokens = sum(s.num_generation_tokens for s in steps)
        drafts = sum(s.num_draft_tokens for s in steps)
        accepted = sum(s.num_accepted_tokens for s in steps)
        print(
            f"\n== {name} batch {args.batch}: {wall * 1e3:.1f} ms, {num_steps} steps, "
            f"{wall / num_steps * 1e3:.3f} ms/step, {tokens} tokens, {tokens / wall:.1f} tok/s, "
            f"drafts {drafts} accepted {accepted}"
        )
        summary.append((name, wall / num_steps * 1e3, tokens / wall))
        for phase in PHASES:
            if counts[phase]:
                print(
                    f"  {phase:<18} {totals[phase] * 1e3:9.2f} ms  {counts[phase]:5d} calls  "
                    f"{totals[phase] / counts[phase] * 1e3:8.3f} ms/call  "
                    f"{totals[phase] / num_steps * 1e3:8.3f} ms/step"
                )
        print("  graph span ms by rows (launch wait + replay):", spans.report())
        print("  graph replay ms by bucket:", graph_replay_ms(llm))
        if args.trace:
            device_trace(run, num_steps, name)
        if profiler is not None:
            for order in ("tottime", "cumulative"):
                pstats.Stats(profiler).sort_stats(order).print_stats(args.cprofile)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"\n== summary, batch {args.batch}")
    for name, ms_per_step, tokens_per_s in summary:
        print(f"  {name:<24} {ms_per_step:7.3f} ms/step  {tokens_per_s:8.1f} tok/s")


if __name__ == "__main__":
    main()
