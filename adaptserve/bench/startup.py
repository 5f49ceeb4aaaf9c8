"""`adaptserve bench startup`: seconds from process start to ready to serve, by phase.

A child process is started with the engine options; it builds the engine (weights, memory profile,
KV cache, CUDA-graph capture, kernel compilation in the warm-up) and prints its phase times as JSON
when it is ready. The parent measures the wall time from before the child starts to that line, so
interpreter start and imports count. The target excludes putting the weights in memory (reading a
checkpoint, or initialising random ones), which the child reports as its `weights` phase.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from adaptserve.bench.results import DEFAULT_MODEL_LABEL, RESULTS_DIR, write_results

_CHILD = """
import json, sys, time
begin = time.perf_counter()
from adaptserve.cli import build_parser, _engine_options
from adaptserve.engine.engine import LLMEngine
from adaptserve.config import EngineConfig
from adaptserve.model.loaders import load_checkpoint
args = build_parser().parse_args(["generate", *sys.argv[1:]])
options = _engine_options(args)
imported = time.perf_counter()
checkpoint = load_checkpoint(options["model"], progress=False)
loaded = time.perf_counter()
engine = LLMEngine(EngineConfig.from_flat(**options), checkpoint=checkpoint, progress=False)
runner = engine.runner
print(json.dumps({"imports": imported - begin, "checkpoint": loaded - imported,
                  "engine": time.perf_counter() - loaded, **runner.startup_seconds,
                  "graphs_captured": runner.graphs.num_captures if runner.graphs else 0}), flush=True)
"""


def add_startup_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--result-dir", default=None, help="default: docs/benchmarks")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes (the first compiles kernels)")


def run_startup_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from adaptserve.runner.device import resolve_device

    engine_argv = _engine_argv(args)
    rows = []
    for index in range(args.repeats):
        start = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, *engine_argv], capture_output=True, text=True, check=False
        )
        total = time.perf_counter() - start
        if child.returncode != 0:
            raise RuntimeError(f"startup child failed:\n{child.stderr[-4000:]}")
        phases = json.loads(child.stdout.strip().splitlines()[-1])
        weights = phases["checkpoint"] + phases.get("weights", 0.0)
        rows.append(
            {
                "run": index,
                "total_s": round(total, 3),
                "weights_s": round(weights, 3),
                "ready_s": round(total - weights, 3),  # the target: start to ready, weights excluded
                "phases_s": {k: round(v, 3) if isinstance(v, float) else v for k, v in phases.items()},
            }
        )
        print(
            f"run {index}: {total:.2f} s total, {weights:.2f} s weights -> ready in {total - weights:.2f} s"
        )
    device = resolve_device(getattr(args, "device", "auto"))
    payload = {
        "model": getattr(args, "model", None) or DEFAULT_MODEL_LABEL,
        "results": rows,
        "torch": torch.__version__,
    }
    path = write_results(
        "startup",
        device,
        payload,
        out_dir=getattr(args, "result_dir", None) or RESULTS_DIR,
        command=getattr(args, "command_line", None),
    )
    print(f"wrote {path}")
    return payload


def _engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags of this invocation, passed on to the child."""
    argv = []
    for flag in (
        "model",
        "dtype",
        "device",
        "max_model_len",
        "max_num_seqs",
        "max_num_batched_tokens",
        "kv_cache_memory_gib",
        "attention_backend",
        "autotune",
        "kernel_cache",
        "cuda_graph_max_batch",
    ):
        value = getattr(args, flag, None)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if getattr(args, "no_cuda_graphs", False):
        argv.append("--no-cuda-graphs")
    return argv
