"""`adaptserve bench offline`: in-process batch-1 decode speed and batch throughput, beside
transformers' `generate` on the same weights, device and dtype, in the same run."""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from adaptserve.bench.results import write_results


@dataclass
class OfflineResult:
    engine: str  # adaptserve | transformers
    dtype: str
    batch1_decode_tok_s: float  # median over rounds: one request, decode steps only (prefill excluded)
    throughput_output_tok_s: float  # median over rounds: num_prompts requests, output tokens / wall time
    throughput_total_tok_s: float  # (prompt + output tokens) / the median wall time
    throughput_elapsed_s: float  # median wall time of the throughput run
    batch1_decode_samples: list[float] = field(default_factory=list)  # every round, in order
    throughput_elapsed_samples: list[float] = field(default_factory=list)


def add_offline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens generated in the batch-1 test")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes to measure")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, engines alternating; medians reported")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
    parser.add_argument("--seed", type=int, default=0)


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids (as vLLM's random dataset), avoiding the first 256 ids (special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(256, vocab_size, (num, length), generator=g).tolist()


class AdaptserveRunner:
    def __init__(self, llm, args):
        from adaptserve import SamplingParams

        self.llm, self.args = llm, args
        self.decode_params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
        self.batch_params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        self._ids = itertools.count()

    def decode_rate(self, prompt: list[int]) -> float:
        engine = self.llm.engine
        engine.add_request(f"bench-decode-{next(self._ids)}", prompt, self.decode_params)
        engine.step()  # prefill + first token
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        return steps / (time.perf_counter() - start)

    def batch_time(self, prompts: list[list[int]]) -> float:
        self.llm.engine.kv_cache.reset_prefix_cache()  # every round computes every prompt
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, self.batch_params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert sum(len(o.outputs[0].token_ids) for o in outputs) == len(prompts) * self.args.output_len
        return elapsed


class TransformersRunner:
    def __init__(self, model, args, device):
        self.model, self.args, self.device = model, args, device

    @torch.inference_mode()
    def _generate(self, batch: list[list[int]], new_tokens: int) -> float:
        ids = torch.tensor(batch, device=self.device)
        sync(self.device)
        start = time.perf_counter()
        self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        sync(self.device)
        return time.perf_counter() - start

    def decode_rate(self, prompt: list[int]) -> float:
        first = self._generate([prompt], 1)
        full = self._generate([prompt], self.args.decode_tokens)
        return (self.args.decode_tokens - 1) / (full - first)

    def batch_time(self, prompts: list[list[int]]) -> float:
        return self._generate(prompts, self.args.output_len)


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
    warmup_prompts = random_prompts(2, 32, checkpoint.arch.vocab_size, args.seed + 2)
    results: list[OfflineResult] = []
    for dtype_name in args.dtypes.split(","):
        llm = LLM.from_checkpoint(
            checkpoint,
            dtype=dtype_name,
            device=str(device),
            max_num_seqs=max(args.max_num_seqs, 1),
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=not args.no_prefix_caching,
        )
        runners = {"adaptserve": AdaptserveRunner(llm, args)}
        if not args.no_baseline:
            model = transformers_model(checkpoint, resolve_dtype(dtype_name, device)).to(device)
            runners["transformers"] = TransformersRunner(model, args, device)
        decode = {name: [] for name in runners}
        elapsed = {name: [] for name in runners}
        for runner in runners.values():  # warm-up: first calls pay for allocation and kernel choice
            runner.decode_rate(decode_prompt)
            runner.batch_time(warmup_prompts)
        # engines alternate within each round, so both see the same phases of a noisy machine
        for _ in tqdm(range(args.rounds), desc=f"rounds ({dtype_name})", unit="round"):
            for name, runner in runners.items():
                decode[name].append(round(runner.decode_rate(decode_prompt), 2))
                elapsed[name].append(round(runner.batch_time(prompts), 3))
        for name in runners:
            results.append(_result(name, dtype_name, decode[name], elapsed[name], args))
            print(_row(results[-1]))
        del llm, runners
    payload = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded GGUF, Q4_1 dequantized)",
        "workload": {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "decode_tokens": args.decode_tokens,
            "rounds": args.rounds,
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


def _result(engine, dtype, decode_samples, elapsed_samples, args) -> OfflineResult:
    elapsed = statistics.median(elapsed_samples)
    num_out = args.num_prompts * args.output_len
    num_total = args.num_prompts * (args.input_len + args.output_len)
    return OfflineResult(
        engine,
        dtype,
        round(statistics.median(decode_samples), 2),
        round(num_out / elapsed, 2),
        round(num_total / elapsed, 2),
        round(elapsed, 3),
        decode_samples,
        elapsed_samples,
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
