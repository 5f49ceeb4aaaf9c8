"""`adaptserve bench prefill`: time to prefill one long prompt, as TFLOP/s and a share of the GEMM peak,
beside a transformers forward pass over the same prompt in the same run.

FLOPs of a prefill of T tokens: 2 * T * (the projections' weights) for the matrix products, plus
attention's QK^T and PV over the causal triangle, 2 * 2 * (T^2 / 2) * heads * head_dim per layer, plus
one lm_head row (the last token's logits). The engine's time is a whole engine step: scheduling, the
forward pass, logits and sampling of the one token.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from adaptserve.bench.offline import free_memory, random_prompts, sync
from adaptserve.bench.results import DEFAULT_MODEL_LABEL, RESULTS_DIR, write_results
from adaptserve.kernel_args import kernel_options, precision_options
from adaptserve.model.config import ModelArchConfig

DEFAULT_PEAK_TFLOPS = 770.0  # bf16 GEMM measured on the H100 this project benchmarks on


def add_prefill_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--result-dir", default=None, help="default: docs/benchmarks")
    parser.add_argument("--prompt-lens", default="4096", help="comma-separated prompt lengths")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills per length (median kept)")
    parser.add_argument(
        "--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="the GEMM rate to compare with"
    )
    parser.add_argument("--baselines", default="eager", help="transformers: eager, or none")
    parser.add_argument("--seed", type=int, default=0)


def prefill_flops(arch: ModelArchConfig, num_tokens: int) -> float:
    hidden, head_dim = arch.hidden_size, arch.head_dim
    q_size, kv_size = arch.num_heads * head_dim, arch.num_kv_heads * head_dim
    per_layer = hidden * (q_size + 2 * kv_size) + q_size * hidden + 3 * hidden * arch.intermediate_size
    matmul = 2.0 * num_tokens * per_layer * arch.num_layers + 2.0 * hidden * arch.vocab_size
    attention = 2.0 * 2.0 * num_tokens * num_tokens / 2 * q_size * arch.num_layers
    return matmul + attention


def run_prefill_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from adaptserve import LLM
    from adaptserve.engine.request import SamplingParams
    from adaptserve.model.loaders import load_checkpoint
    from adaptserve.runner.device import resolve_device, resolve_dtype

    device = resolve_device(getattr(args, "device", "auto"))
    dtype = resolve_dtype(getattr(args, "dtype", "auto"), device)
    lengths = [int(x) for x in args.prompt_lens.split(",")]
    checkpoint = load_checkpoint(getattr(args, "model", None))
    arch = checkpoint.arch
    longest = max(lengths)
    llm = LLM.from_checkpoint(
        checkpoint,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        max_model_len=longest + 8,
        max_num_batched_tokens=longest,
        max_num_seqs=8,
        enable_prefix_caching=False,
        kv_cache_memory_gib=max(1.0, 2 * longest * arch.kv_bytes_per_token(dtype.itemsize) / 2**30),
        **kernel_options(args),
        **precision_options(args),
    )
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rows = []
    for length in lengths:
        prompt = random_prompts(1, length, arch.vocab_size, args.seed)[0]
        llm.generate([prompt], params)  # warm-up: compiles the kernels for this shape
        samples = []
        for _ in range(args.repeats):
            sync(device)
            start = time.perf_counter()
            llm.generate([prompt], params)
            sync(device)
            samples.append(time.perf_counter() - start)
        rows.append(_row("adaptserve", arch, length, samples, args.peak_tflops))
    del llm
    free_memory(device)
    if args.baselines not in ("", "none"):
        rows += _transformers_rows(checkpoint, dtype, device, lengths, args)
    payload = {
        "model": getattr(args, "model", None) or DEFAULT_MODEL_LABEL,
        "dtype": str(dtype).removeprefix("torch."),
        "peak_tflops": args.peak_tflops,
        "results": rows,
    }
    path = write_results(
        "prefill",
        device,
        payload,
        out_dir=getattr(args, "result_dir", None) or RESULTS_DIR,
        command=getattr(args, "command_line", None),
    )
    for row in rows:
        print(
            f"{row['engine']:>22} {row['prompt_len']:>6} tokens: {row['seconds'] * 1e3:8.1f} ms "
            f"{row['tflops']:7.1f} TFLOP/s = {row['peak_fraction']:.1%} of {args.peak_tflops:g}"
        )
    print(f"wrote {path}")
    return payload


def _row(engine: str, arch: ModelArchConfig, length: int, samples: list[float], peak: float) -> dict:
    seconds = statistics.median(samples)
    tflops = prefill_flops(arch, length) / seconds / 1e12
    return {
        "engine": engine,
        "prompt_len": length,
        "seconds": round(seconds, 5),
        "samples": [round(s, 5) for s in samples],
        "tflops": round(tflops, 1),
        "peak_fraction": round(tflops / peak, 4),
        "prompt_tokens_per_s": round(length / seconds, 1),
    }


@torch.inference_mode()
def _transformers_rows(checkpoint, dtype, device, lengths, args) -> list[dict]:
    from adaptserve.bench.hf_baseline import transformers_model

    model = transformers_model(checkpoint, dtype, device)
    rows = []
    for length in lengths:
        ids = torch.tensor(random_prompts(1, length, checkpoint.arch.vocab_size, args.seed), device=device)
        model(ids, logits_to_keep=1)  # warm-up
        samples = []
        for _ in range(args.repeats):
            sync(device)
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            sync(device)
            samples.append(time.perf_counter() - start)
        rows.append(_row("transformers-eager", checkpoint.arch, length, samples, args.peak_tflops))
    del model
    free_memory(device)
    return rows
