"""Small-M projections on CUDA: F.linear (cuBLAS) against every Triton GEMV config, per model's shapes.

For each projection (K -> N) and row count M, every implementation is first checked against a float32
F.linear, then timed: a CUDA graph of back-to-back calls (so Python launch overhead is not timed, as
in CUDA-graph decoding) rotating over copies of the weight that together exceed 200 MB, so that no
call finds its weight in the 50 MB L2 (x stays there, as in decoding). The time per call is the
median over graph replays divided by the calls in the graph; TB/s is weight bytes / time.

Usage (from the repository root, on a CUDA machine; well under two minutes, mostly compiling):
    PYTHONPATH=. python3 scripts/gemv_bench.py --out gemv_bench.json
    PYTHONPATH=. python3 scripts/gemv_bench.py --model smollm2-135m --dtype float32 --rows 1,2,3,5,9,16
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

from adaptserve.bench.results import git_commit
from adaptserve.kernels.triton_gemv import CONFIGS, configs_for, gemv, pick_config

MODEL_SHAPES = {  # model: {projection: (K, N)}, with the engine's fused qkv and gate_up
    "llama-3.1-8b": {
        "qkv": (4096, 6144),
        "o_proj": (4096, 4096),
        "gate_up": (4096, 28672),
        "down": (14336, 4096),
        "lm_head": (4096, 128256),
    },
    "smollm2-135m": {
        "qkv": (576, 960),
        "o_proj": (576, 576),
        "gate_up": (576, 3072),
        "down": (1536, 576),
        "lm_head": (576, 49152),
    },
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROWS = (1, 2, 4, 8, 16)
ROTATION_BYTES = 200e6  # distinct weight copies per shape add up to more than this (L2 is 50 MB)
GRAPH_BYTES = 2e9  # weight bytes one timed graph replay reads (sets the calls per graph)
MIN_CALLS = 10
REPLAYS = 10
RTOL, ATOL = 2.0**-7, 1e-2  # bf16 output vs float32 reference; outputs are of order 1


def config_name(config: dict) -> str:
    kind = "dot" if config["use_dot"] else "fma"
    return (
        f"{kind} n{config['block_n']} k{config['block_k']} s{config['split_k']} "
        f"w{config['num_warps']} st{config['num_stages']}"
        + (f" m{config['block_m']}" if "block_m" in config else "")
    )


def make_weights(in_features: int, out_features: int, dtype: torch.dtype) -> list[torch.Tensor]:
    weight_bytes = in_features * out_features * dtype.itemsize
    copies = int(ROTATION_BYTES // weight_bytes) + 1
    return [
        torch.randn(out_features, in_features, device="cuda", dtype=dtype) / in_features**0.5
        for _ in range(copies)
    ]  # copies x [N, K]


def check(fn, x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, float]:
    """fn(x, weight) against float32 F.linear: (within tolerance, max abs error)."""
    expected = F.linear(x.float(), weight.float())  # [M, N]
    actual = fn(x, weight).float()
    error = (actual - expected).abs()
    return bool((error <= ATOL + RTOL * expected.abs()).all()), error.max().item()


def time_per_call_us(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    weight_bytes = weights[0].numel() * weights[0].element_size()
    calls = max(MIN_CALLS, triton.cdiv(int(GRAPH_BYTES), weight_bytes))
    calls = triton.cdiv(calls, len(weights)) * len(weights)
    for weight in weights:
        fn(x, weight)  # warm (and compiled) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(x, weights[i % len(weights)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times_ms = []
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    del graph
    return statistics.median(times_ms) * 1e3 / calls


def bench_shape(
    name: str,
    in_features: int,
    out_features: int,
    rows: tuple[int, ...],
    dtype: torch.dtype,
    every_config: bool,
) -> list[dict]:
    weights = make_weights(in_features, out_features, dtype)
    weight_bytes = in_features * out_features * dtype.itemsize
    records = []
    for num_rows in rows:
        x = torch.randn(num_rows, in_features, device="cuda", dtype=dtype)  # [M, K]
        picked = pick_config(num_rows, out_features, in_features)
        configs = CONFIGS if every_config else configs_for(num_rows)
        impls = [("cublas", None, F.linear)] + [
            (config_name(c), c, lambda x, w, c=c: gemv(x, w, config=c)) for c in configs
        ]
        for impl, config, fn in impls:
            record = {"shape": name, "K": in_features, "N": out_features, "M": num_rows, "impl": impl}
            record |= {"config": config, "picked": config == picked}
            if config is not None:
                resources: dict = {}
                gemv(x, weights[0], config=config, resources=resources)
                record["resources"] = resources
            record["ok"], record["max_abs_error"] = check(fn, x, weights[0])
            if record["ok"]:
                record["us"] = time_per_call_us(fn, x, weights)
                record["tbps"] = weight_bytes / record["us"] / 1e6
            records.append(record)
    del weights
    torch.cuda.empty_cache()
    return records


def print_tables(records: list[dict]) -> None:
    names = [config_name(c) for c in CONFIGS]
    print("\nconfigs:", *(f"  c{i}: {n}" for i, n in enumerate(names)), sep="\n")
    print("\nµs per call (cuBLAS, then each config; - not run, FAIL wrong result)")
    print(f"{'shape':>8} {'M':>3} {'cublas':>8}" + "".join(f"{'c' + str(i):>8}" for i in range(len(names))))
    for (shape, num_rows), group in _groups(records):
        cells = {r["impl"]: ("FAIL" if not r["ok"] else f"{r['us']:.1f}") for r in group}
        line = f"{shape:>8} {num_rows:>3} {cells['cublas']:>8}"
        print(line + "".join(f"{cells.get(n, '-'):>8}" for n in names))
    print("\nachieved weight bandwidth, TB/s")
    print(f"{'shape':>8} {'M':>3} {'cublas':>8} {'best':>8} {'picked':>8} {'best/cublas':>11}  best config")
    for (shape, num_rows), group in _groups(records):
        cublas = next(r for r in group if r["impl"] == "cublas")
        triton_runs = [r for r in group if r["impl"] != "cublas" and r["ok"]]
        if not triton_runs or not cublas["ok"]:
            print(f"{shape:>8} {num_rows:>3}  (no valid runs)")
            continue
        best = min(triton_runs, key=lambda r: r["us"])
        picked = next((r for r in triton_runs if r["picked"]), None)
        picked_tbps = f"{picked['tbps']:.2f}" if picked else "FAIL"
        print(
            f"{shape:>8} {num_rows:>3} {cublas['tbps']:>8.2f} {best['tbps']:>8.2f} {picked_tbps:>8} "
            f"{cublas['us'] / best['us']:>11.2f}  {best['impl']}"
        )


def _groups(records: list[dict]):
    keys = list(dict.fromkeys((r["shape"], r["M"]) for r in records))
    return [(key, [r for r in records if (r["shape"], r["M"]) == key]) for key in keys]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gemv_bench.json", help="where to write the JSON results")
    parser.add_argument("--model", default="llama-3.1-8b", choices=sorted(MODEL_SHAPES), help="whose shapes")
    parser.add_argument("--shapes", default=None, help="comma-separated subset of the shapes (default: all)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated row counts M")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument(
        "--every-config", action="store_true", help="time CUDA-core configs past their row limit too"
    )
    args = parser.parse_args()
    shapes = MODEL_SHAPES[args.model]
    if not torch.cuda.is_available():
        print("gemv_bench needs a CUDA device", file=sys.stderr)
        return 2
    rows = tuple(int(m) for m in args.rows.split(","))
    started = time.monotonic()
    records = []
    for name in (args.shapes or ",".join(shapes)).split(","):
        in_features, out_features = shapes[name]
        records += bench_shape(name, in_features, out_features, rows, DTYPES[args.dtype], args.every_config)
        print(f"{name}: done at {time.monotonic() - started:.0f} s", flush=True)
    print_tables(records)
    result = {
        "benchmark": "gemv",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": "python3 scripts/gemv_bench.py " + shlex.join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "model": args.model,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rotation_bytes": ROTATION_BYTES,
        "graph_bytes": GRAPH_BYTES,
        "seconds": round(time.monotonic() - started, 1),
        "records": records,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out} ({result['seconds']} s)")
    failures = [r for r in records if not r["ok"]]
    for r in failures:
        print(f"FAIL {r['shape']} M={r['M']} {r['impl']}: max abs error {r['max_abs_error']:.3g}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
