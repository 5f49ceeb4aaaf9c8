"""Small-batch projections with quantized weights on CUDA, Llama-3.1-8B shapes, M = 1..32.

Per projection (K -> N) and row count M it times:
- bf16: `adaptserve.kernels.linear.linear` (the Triton GEMV at M = 1, cuBLAS otherwise);
- fp8 W8A8: `fp8_w8a8_linear` (activations quantized per token, then torch._scaled_mm);
- fp8 weight-only: `fp8_gemv`, every config that suits M;
- int4, group sizes 128 and 64: `int4_dequant_linear` (the old path: dequantize all, then cuBLAS) and
  `int4_gemv`, every config that suits M: the byte kernel and the folded one (config "folded",
  triton_int4_gemv.py); and PyTorch's tinygemm (`tinygemm_linear`, kernels/quant/int4_tinygemm.py)
  on the same codes in its own layout.

Each implementation is first checked against a float32 product (TF32 off) with its own numbers: the
dequantized weight, or for W8A8 the emulation from the same float8 activations; every record also
has its error against the exact weight-only product (x @ dequantized weight, float32), which shows
what W8A8's activation rounding costs. Then it is timed as in gemv_bench.py: a CUDA graph of
back-to-back calls rotating over copies of the weight that together exceed 200 MB, so that no call
finds its weight in the 50 MB L2; time per call = median over graph replays / calls in the graph. The
int4 dequantize path allocates a full-size weight per call and is timed eagerly instead. GB/s = (bytes
of the weight in its format + bytes of x) / time. A config that fails to compile or run is recorded
with its error (SKIP) and the run goes on; the exit status is 1 only for wrong results.

At the end it prints, per shape and M, the best bf16 time and the best fp8 and int4 (group 128) configs
with their speed-ups over bf16, the int4 byte kernel and the folded kernel each on their own.

Usage (from the repository root, on a CUDA machine; about a minute with --rows 1,32, mostly compiling):
    PYTHONPATH=. python3 scripts/quant_gemv_bench.py --rows 1,32 --out docs/benchmarks/quant_gemv-h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
import triton
from gemv_bench import _groups, config_name  # scripts/ is on the path when run as a script

from adaptserve.bench.results import git_commit
from adaptserve.kernels.linear import linear
from adaptserve.kernels.quant.fp8 import (
    Fp8Weight,
    _can_use_scaled_mm,
    dequantize_fp8,
    fp8_w8a8_linear,
    quantize_fp8_activation,
    quantize_fp8_weight,
)
from adaptserve.kernels.quant.int4 import (
    Int4Weight,
    dequantize_int4,
    int4_dequant_linear,
    quantize_int4_weight,
)
from adaptserve.kernels.quant.int4_tinygemm import TinygemmInt4, tinygemm_linear
from adaptserve.kernels.quant_gemv_configs import CONFIGS, configs_for, pick_config
from adaptserve.kernels.triton_quant_gemv import fp8_gemv, int4_gemv

SHAPES = {  # name: (K, N) of Llama-3.1-8B
    "qkv": (4096, 6144),
    "o_proj": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
ROWS = (1, 2, 4, 8, 16, 32)
GROUP_SIZES = (128, 64)
ROTATION_BYTES = 200e6  # distinct weight copies per format add up to more than this (L2 is 50 MB)
GRAPH_BYTES = 1e9  # weight bytes one timed graph replay reads (sets the calls per graph)
MIN_CALLS = 10
EAGER_CALLS = 5
REPLAYS = 10
RTOL, ATOL = 2.0**-7, 1e-2  # bf16 output vs float32 reference; outputs are of order 1


@dataclass
class Impl:
    """One implementation at one shape: fn(x, weight) over rotating weight copies."""

    name: str
    kind: str  # bf16, fp8_w8a8, fp8, int4_dequant, int4
    fn: Callable
    weights: list  # copies of the weight in this implementation's format
    reference: Callable  # x -> float32 [M, N] that fn must match
    exact: Callable  # x -> float32 [M, N]: x @ the dequantized weight
    config: dict | None = None  # a Triton kernel's launch config
    group_size: int | None = None  # int4 only
    graph: bool = True  # timed as a CUDA graph (else eagerly)
    scaled_mm: bool | None = None  # W8A8 only: whether torch._scaled_mm ran (else the emulation)


def nbytes(weight, kind: str = "") -> int:
    """Bytes a call reads of the weight: an int4 weight's own codes, scales and zeros, or only its
    tinygemm copy (kind int4_tinygemm)."""
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    if isinstance(weight, Int4Weight) and weight.tinygemm is not None:
        return weight.tinygemm.nbytes if kind == "int4_tinygemm" else weight.nbytes - weight.tinygemm.nbytes
    return weight.nbytes


def copies(first, clone: Callable) -> list:
    """`first` and enough clones at other addresses that together they exceed ROTATION_BYTES."""
    return [first] + [clone(first) for _ in range(int(ROTATION_BYTES // nbytes(first)))]


@dataclass
class ShapeWeights:
    """The weights of one projection in every format, each with its rotation copies."""

    bf16: list
    fp8: list
    int4: dict  # group size -> list of Int4Weight
    scaled_mm: bool  # whether fp8_w8a8_linear runs torch._scaled_mm here (else its emulation)

    @classmethod
    def make(cls, in_features: int, out_features: int) -> ShapeWeights:
        w = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) / in_features**0.5
        fp8 = quantize_fp8_weight(w)
        int4 = {g: quantize_int4_weight(w, g, refine_steps=0) for g in GROUP_SIZES}
        clone_fp8 = lambda q: Fp8Weight(q.weight.clone(), q.scale.clone())
        clone_int4 = lambda q: Int4Weight(
            q.packed.clone(), q.scales.clone(), q.zeros.clone(), q.group_size, _clone_tinygemm(q.tinygemm)
        )
        return cls(
            bf16=copies(w, torch.clone),
            fp8=copies(fp8, clone_fp8),
            int4={g: copies(q, clone_int4) for g, q in int4.items()},
            scaled_mm=_can_use_scaled_mm(w, fp8),
        )

    def impls(self, num_rows: int) -> list[Impl]:
        """Every implementation for `num_rows` rows, with its reference and the exact weight-only product."""
        w, fp8 = self.bf16[0], self.fp8[0]
        exact_bf16 = partial(_product, weight=w.float())
        exact_fp8 = partial(_product, weight=dequantize_fp8(fp8, torch.float32))
        w8a8 = partial(w8a8_emulated, w=fp8)
        impls = [
            Impl("bf16", "bf16", linear, self.bf16, exact_bf16, exact_bf16),
            Impl(
                "fp8 w8a8", "fp8_w8a8", fp8_w8a8_linear, self.fp8, w8a8, exact_fp8, scaled_mm=self.scaled_mm
            ),
        ]
        for config in configs_for("fp8", num_rows):
            fn = partial(fp8_gemv, config=config)
            impls.append(Impl(f"fp8 {_name(config)}", "fp8", fn, self.fp8, exact_fp8, exact_fp8, config))
        for group_size, weights in self.int4.items():
            exact = partial(_product, weight=dequantize_int4(weights[0], torch.float32))
            name = f"int4 g{group_size}"
            fn = int4_dequant_linear
            impls.append(
                Impl(f"{name} dequant", "int4_dequant", fn, weights, exact, exact, None, group_size, False)
            )
            if weights[0].tinygemm is not None:  # PyTorch's tinygemm (kernels/quant/int4_tinygemm.py)
                fn = lambda x, q: tinygemm_linear(x, q.tinygemm)
                impls.append(
                    Impl(f"{name} tinygemm", "int4_tinygemm", fn, weights, exact, exact, None, group_size)
                )
            for config in configs_for("int4", num_rows):
                fn = partial(int4_gemv, config=config)
                impls.append(
                    Impl(f"{name} {_name(config)}", "int4", fn, weights, exact, exact, config, group_size)
                )
        return impls


def _clone_tinygemm(t: TinygemmInt4 | None) -> TinygemmInt4 | None:
    return (
        None
        if t is None
        else replace(t, packed=t.packed.clone(), scales_and_zeros=t.scales_and_zeros.clone())
    )


def _name(config: dict) -> str:
    return config_name(config) + (" folded" if config.get("folded") else "")


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), weight)  # [M, N] float32


def w8a8_emulated(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """What scaled_mm computes, in float32 from the same float8 activations and weights: [M, N]."""
    x_fp8, x_scale = quantize_fp8_activation(x)  # [M, K], [M, 1]
    return (x_fp8.float() @ w.weight.float().t()) * x_scale * w.scale[None, :]


def time_per_call_us(impl: Impl, x: torch.Tensor) -> float:
    weights = impl.weights
    calls = max(MIN_CALLS, triton.cdiv(int(GRAPH_BYTES), nbytes(weights[0])))
    calls = triton.cdiv(calls, len(weights)) * len(weights) if impl.graph else EAGER_CALLS
    for weight in weights:
        impl.fn(x, weight)  # warm (and compiled) outside the capture
    torch.cuda.synchronize()
    run = lambda: [impl.fn(x, weights[i % len(weights)]) for i in range(calls)]
    if impl.graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times_ms = []
    for _ in range(REPLAYS):
        start.record()
        run()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    return statistics.median(times_ms) * 1e3 / calls


def measure(impl: Impl, x: torch.Tensor, record: dict) -> None:
    """Check, then time; a failure (a config that does not compile, say) is recorded, not raised."""
    try:
        if impl.config is not None:
            resources: dict = {}
            kernel = fp8_gemv if impl.kind == "fp8" else int4_gemv
            kernel(x, impl.weights[0], config=impl.config, resources=resources)
            record["resources"] = resources
        actual = impl.fn(x, impl.weights[0]).float()  # [M, N]
        expected = impl.reference(x)
        error = (actual - expected).abs()
        record["ok"] = bool((error <= ATOL + RTOL * expected.abs()).all())
        record["max_abs_error"] = error.max().item()
        record["max_abs_error_vs_weight_only"] = (actual - impl.exact(x)).abs().max().item()
        if record["ok"]:
            record["us"] = time_per_call_us(impl, x)
            record["gbps"] = record["bytes"] / record["us"] / 1e3
    except Exception as e:  # a compile or launch failure of one config; the rest still run
        record["ok"] = False
        record["error"] = f"{type(e).__name__}: {e}"[:2000]


def bench_shape(name: str, in_features: int, out_features: int, rows: tuple[int, ...]) -> list[dict]:
    weights = ShapeWeights.make(in_features, out_features)
    records = []
    for num_rows in rows:
        x = torch.randn(num_rows, in_features, device="cuda", dtype=torch.bfloat16)  # [M, K]
        picked = {kind: pick_config(kind, num_rows, out_features, in_features) for kind in CONFIGS}
        for impl in weights.impls(num_rows):
            record = {"shape": name, "K": in_features, "N": out_features, "M": num_rows, "impl": impl.name}
            record |= {"kind": impl.kind, "group_size": impl.group_size, "config": impl.config}
            if impl.scaled_mm is not None:
                record["scaled_mm"] = impl.scaled_mm
            record["picked"] = impl.config is not None and impl.config == picked[impl.kind]
            record["bytes"] = nbytes(impl.weights[0], impl.kind) + x.numel() * x.element_size()
            measure(impl, x, record)
            records.append(record)
    del weights
    torch.cuda.empty_cache()
    return records


def _best(group: list[dict], kind: str, group_size: int | None = None) -> dict | None:
    runs = [r for r in group if r["kind"] == kind and r["group_size"] == group_size and "us" in r]
    return min(runs, key=lambda r: r["us"]) if runs else None


def print_tables(records: list[dict]) -> None:
    columns = [("bf16", "bf16", None), ("fp8 w8a8", "fp8_w8a8", None), ("fp8", "fp8", None)]
    for g in GROUP_SIZES:
        columns += [
            (f"i4g{g} deq", "int4_dequant", g),
            (f"i4g{g}", "int4", g),
            (f"i4g{g} tg", "int4_tinygemm", g),
        ]
    print("\nµs per call (best config of each kernel; x = speed-up over bf16; - not run or failed)")
    print(f"{'shape':>8} {'M':>3}" + "".join(f"{title:>16}" for title, _, _ in columns))
    best_configs = []
    for (shape, num_rows), group in _groups(records):
        bf16 = _best(group, "bf16")
        cells = []
        for _, kind, g in columns:
            best = _best(group, kind, g)
            speedup = f" {bf16['us'] / best['us']:.2f}x" if best and bf16 else ""
            cells.append(f"{best['us']:.1f}{speedup}" if best else "-")
        print(f"{shape:>8} {num_rows:>3}" + "".join(f"{c:>16}" for c in cells))
        best_configs.append(
            (shape, num_rows, [_best(group, k, g) for _, k, g in columns if k in ("fp8", "int4")])
        )
    print("\nbest configs (GB/s; * = the one pick_config chose)")
    for shape, num_rows, bests in best_configs:
        cells = [f"{b['impl']} {b['gbps']:.0f}{'*' if b['picked'] else ''}" if b else "-" for b in bests]
        print(f"{shape:>8} {num_rows:>3}  " + " | ".join(cells))


def _best_where(group: list[dict], keep: Callable) -> dict | None:
    runs = [r for r in group if "us" in r and keep(r)]
    return min(runs, key=lambda r: r["us"]) if runs else None


def print_summary(records: list[dict]) -> None:
    """Per shape and M: best bf16, best fp8 weight-only and int4 g128 (byte and folded kernels), each
    with its config, time, GB/s and speed-up over bf16."""
    kinds = {
        "fp8": lambda r: r["kind"] == "fp8",
        "int4": lambda r: r["kind"] == "int4" and r["group_size"] == 128 and not r["config"].get("folded"),
        "int4 folded": lambda r: r["kind"] == "int4" and r["group_size"] == 128 and r["config"].get("folded"),
        "int4 tinygemm": lambda r: r["kind"] == "int4_tinygemm" and r["group_size"] == 128,
    }
    print("\nsummary: µs (GB/s, speed-up over bf16) and config of the best run of each kernel")
    for (shape, num_rows), group in _groups(records):
        bf16 = _best_where(group, lambda r: r["kind"] == "bf16")
        line = f"{shape:>8} M={num_rows:<3} bf16 " + (f"{bf16['us']:.1f}" if bf16 else "-")
        for title, keep in kinds.items():
            best = _best_where(group, keep)
            if best is None:
                line += f" | {title} -"
                continue
            ratio = f" {bf16['us'] / best['us']:.2f}x" if bf16 else ""
            config = _name(best["config"]).removesuffix(" folded") if best["config"] else ""
            line += f" | {title} {best['us']:.1f} ({best['gbps']:.0f}{ratio}) {config}"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="docs/benchmarks/quant_gemv-h100.json", help="the JSON results")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of the shapes")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated row counts M")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("quant_gemv_bench needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 references in full float32
    rows = tuple(int(m) for m in args.rows.split(","))
    started = time.monotonic()
    records = []
    for name in args.shapes.split(","):
        in_features, out_features = SHAPES[name]
        records += bench_shape(name, in_features, out_features, rows)
        print(f"{name}: done at {time.monotonic() - started:.0f} s", flush=True)
    print_tables(records)
    print_summary(records)
    result = {
        "benchmark": "quant_gemv",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": "python3 scripts/quant_gemv_bench.py " + shlex.join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rotation_bytes": ROTATION_BYTES,
        "graph_bytes": GRAPH_BYTES,
        "configs": CONFIGS,
        "seconds": round(time.monotonic() - started, 1),
        "records": records,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out} ({result['seconds']} s)")
    for r in records:
        if "error" in r:
            print(f"SKIP {r['shape']} M={r['M']} {r['impl']}: {r['error'][:300]}")
        elif not r["ok"]:
            print(f"FAIL {r['shape']} M={r['M']} {r['impl']}: max abs error {r['max_abs_error']:.3g}")
    return 1 if any(not r["ok"] and "error" not in r for r in records) else 0  # wrong results only


if __name__ == "__main__":
    sys.exit(main())
