"""`adaptserve bench offline`: in-process batch-1 decode speed and batch throughput, beside
transformers' `generate` on the same weights, device and dtype, in the same run."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import torch

from adaptserve.bench.results import write_results


@dataclass
class OfflineResult:
    engine: str  # adaptserve | transformers
    dtype: str
    batch1_decode_tok_s: float  # one request, decode steps only (prefill excluded)
    throughput_output_tok_s: float  # num_prompts requests, output tokens / wall time
    throughput_total_tok_s: float  # (prompt + output tokens) / wall time
    throughput_elapsed_s: float


def add_offline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens generated in the batch-1 test")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes to measure")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
    parser.add_argument("--seed", type=int, default=0)


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids (as vLLM's random dataset), avoiding the first 256 ids (special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(256, vocab_size, (num, length), generator=g).tolist()


def bench_adaptserve(llm, prompts, decode_prompt, args) -> tuple[float, float]:
    from adaptserve import SamplingParams

    decode_params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    llm.generate(
        decode_prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    engine = llm.engine
    engine.add_request("bench-decode", decode_prompt, decode_params)
    engine.step()  # prefill + first token
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    decode_tok_s = steps / (time.perf_counter() - start)

    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.engine.kv_cache.reset_prefix_cache()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == len(prompts) * args.output_len
    return decode_tok_s, elapsed


@torch.inference_mode()
def bench_transformers(model, prompts, decode_prompt, args, device) -> tuple[float, float]:
    def generate(batch, new_tokens):
        ids = torch.tensor(batch, device=device)
        sync(device)
        start = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        sync(device)
        return time.perf_counter() - start

    generate([decode_prompt], 8)  # warm-up
    first = generate([decode_prompt], 1)
    full = generate([decode_prompt], args.decode_tokens)
    decode_tok_s = (args.decode_tokens - 1) / (full - first)
    return decode_tok_s, generate(prompts, args.output_len)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_offline_benchmark(args: argparse.Namespace) -> list[OfflineResult]:
    from adaptserve import LLM
    from adaptserve.bench.hf_baseline import transformers_model
    from adaptserve.model.loaders import load_checkpoint
    from adaptserve.runner.device import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.model)
    prompts = random_prompts(args.num_prompts, args.input_len, checkpoint.arch.vocab_size, args.seed)
    decode_prompt = random_prompts(1, 16, checkpoint.arch.vocab_size, args.seed + 1)[0]
    results: list[OfflineResult] = []
    for dtype_name in args.dtypes.split(","):
        dtype = resolve_dtype(dtype_name, device)
        llm = LLM.from_checkpoint(
            checkpoint,
            dtype=dtype_name,
            device=str(device),
            max_num_seqs=max(args.max_num_seqs, 1),
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=not args.no_prefix_caching,
        )
        decode, elapsed = bench_adaptserve(llm, prompts, decode_prompt, args)
        results.append(_result("adaptserve", dtype_name, decode, elapsed, args))
        del llm
        print(_row(results[-1]))
        if not args.no_baseline:
            model = transformers_model(checkpoint, dtype).to(device)
            decode, elapsed = bench_transformers(model, prompts, decode_prompt, args, device)
            results.append(_result("transformers", dtype_name, decode, elapsed, args))
            del model
            print(_row(results[-1]))
    payload = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded GGUF, Q4_1 dequantized)",
        "workload": {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "decode_tokens": args.decode_tokens,
            "prompts": "random token ids, seeded",
        },
        "engine_options": {
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "prefix_caching": not args.no_prefix_caching,
        },
        "results": [asdict(r) for r in results],
    }
    path = write_results("offline", device, payload)
    plot_offline(results, path.with_suffix(".png"))
    print(f"wrote {path}")
    print(markdown_table(results))
    return results


def _result(engine, dtype, decode_tok_s, elapsed, args) -> OfflineResult:
    num_out = args.num_prompts * args.output_len
    num_total = args.num_prompts * (args.input_len + args.output_len)
    return OfflineResult(
        engine,
        dtype,
        round(decode_tok_s, 2),
        round(num_out / elapsed, 2),
        round(num_total / elapsed, 2),
        round(elapsed, 3),
    )


def _row(r: OfflineResult) -> str:
    return (
        f"{r.engine:>12} {r.dtype:>9}: batch-1 decode {r.batch1_decode_tok_s:8.1f} tok/s | "
        f"throughput {r.throughput_output_tok_s:8.1f} output tok/s ({r.throughput_elapsed_s:.1f} s)"
    )


def markdown_table(results: list[OfflineResult]) -> str:
    lines = ["| engine | dtype | batch-1 decode (tok/s) | throughput (output tok/s) |", "|---|---|---:|---:|"]
    lines += [
        f"| {r.engine} | {r.dtype} | {r.batch1_decode_tok_s:.1f} | {r.throughput_output_tok_s:.1f} |"
        for r in results
    ]
    return "\n".join(lines)


def plot_offline(results: list[OfflineResult], path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r.engine}\n{r.dtype}" for r in results]
    colors = ["tab:blue" if r.engine == "adaptserve" else "tab:gray" for r in results]
    axes[0].bar(labels, [r.batch1_decode_tok_s for r in results], color=colors)
    axes[0].set_title("batch-1 decode (tokens/s)")
    axes[1].bar(labels, [r.throughput_output_tok_s for r in results], color=colors)
    axes[1].set_title("throughput (output tokens/s)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
