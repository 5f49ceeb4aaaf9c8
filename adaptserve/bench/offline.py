"""`adaptserve bench offline`: in-process throughput on a workload, beside transformers' `generate` on
the same model, device and dtype, in the same run.

Our engine takes the whole workload as one continuous batch (greedy, ignore EOS, each request its own
output length). transformers gets it in batches of `--hf-max-batch-size` requests in workload order,
left-padded, each batch generating its longest output length (as vLLM's HF throughput backend);
tokens past a request's own length are wasted work, not counted. Its "static" variant pads every
batch to the workload's longest prompt and output and to a full batch, so one compiled graph serves
the whole run; the compilation is paid in a warm-up batch before timing.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from adaptserve.bench.results import DEFAULT_MODEL_LABEL, write_results
from adaptserve.bench.workload_args import add_workload_args, workload_from_args
from adaptserve.bench.workloads import BenchRequest
from adaptserve.kernel_args import kernel_options, precision_options


@dataclass
class OfflineResult:
    engine: str  # adaptserve | transformers-eager | transformers-static
    dtype: str
    request_throughput: float  # requests / median wall time
    throughput_output_tok_s: float  # requested output tokens / median wall time
    throughput_total_tok_s: float  # (prompt + requested output tokens) / median wall time
    elapsed_s: float  # median wall time of a run over the whole workload
    elapsed_samples: list[float] = field(default_factory=list)  # every round, in order
    num_prompts: int = 0  # prompts this engine ran: the workload's first ones (see --hf-num-prompts)


def add_offline_args(parser: argparse.ArgumentParser) -> None:
    add_workload_args(parser, default_dataset="random")
    parser.set_defaults(num_prompts=256, random_input_len=512, random_output_len=128)
    parser.add_argument("--rounds", type=int, default=1, help="rounds, engines alternating; medians reported")
    parser.add_argument(
        "--baselines", default="eager,static", help="transformers variants: eager, static; 'none' for none"
    )
    parser.add_argument("--hf-max-batch-size", type=int, default=64, help="transformers' batch size")
    parser.add_argument(
        "--hf-num-prompts",
        type=int,
        default=None,
        help="transformers runs only the workload's first N prompts (its rates stay comparable; a "
        "1,000-prompt run of an 8B model in transformers takes longer than a benchmark should)",
    )
    parser.add_argument("--result-dir", default="docs/benchmarks")


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids (as vLLM's random dataset), avoiding the first 256 ids (special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(256, vocab_size, (num, length), generator=g).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Let one engine's weights and caches go before the next engine's arrive."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class AdaptserveRunner:
    """The whole workload as one continuous batch through our engine."""

    def __init__(self, llm):
        from adaptserve import SamplingParams

        self.llm = llm
        self._params = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    def run(self, requests: list[BenchRequest]) -> float:
        window = self.llm.engine.max_model_len
        too_long = [r for r in requests if r.prompt_len + r.output_len > window]
        if too_long:
            raise ValueError(
                f"{len(too_long)} requests need more than the context window ({window} tokens), e.g. "
                f"{too_long[0].prompt_len} prompt + {too_long[0].output_len} output; raise --max-model-len "
                "or shorten the workload"
            )
        self.llm.engine.kv_cache.reset_prefix_cache()  # every round computes every prompt
        params = [self._params(r.output_len) for r in requests]
        start = time.perf_counter()
        outputs = self.llm.generate([r.prompt for r in requests], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        produced = [len(o.outputs[0].token_ids) for o in outputs]
        assert produced == [r.output_len for r in requests], "ignore_eos runs must give every token"
        return elapsed


class TransformersRunner:
    """The workload in batches through transformers' generate (see the module docstring)."""

    def __init__(self, generator, requests: list[BenchRequest], max_batch_size: int):
        self.generator = generator
        self.static = generator.variant == "static"
        self.max_batch_size = max_batch_size
        self.prompt_len = max(r.prompt_len for r in requests)
        self.output_len = max(r.output_len for r in requests)

    def run(self, requests: list[BenchRequest]) -> float:
        return sum(
            self._batch(requests[i : i + self.max_batch_size])
            for i in range(0, len(requests), self.max_batch_size)
        )

    def warm_up(self, requests: list[BenchRequest]) -> None:
        self._batch(requests[: self.max_batch_size], new_tokens=2 if not self.static else None)

    def _batch(self, batch: list[BenchRequest], new_tokens: int | None = None) -> float:
        prompts = [list(r.prompt) for r in batch]
        if self.static:  # one shape for the whole run: longest prompt, longest output, full batch
            prompts += [prompts[-1]] * (self.max_batch_size - len(prompts))
            prompts = [[0] * (self.prompt_len - len(p)) + p for p in prompts]
            new_tokens = new_tokens or self.output_len
            return self.generator.time_generate(prompts, new_tokens, self.prompt_len + self.output_len)
        return self.generator.time_generate(prompts, new_tokens or max(r.output_len for r in batch))


def run_offline_benchmark(args: argparse.Namespace) -> list[OfflineResult]:
    from adaptserve import LLM
    from adaptserve.bench.decode import parse_baselines
    from adaptserve.bench.hf_baseline import TransformersGenerator, transformers_model
    from adaptserve.model.loaders import load_checkpoint
    from adaptserve.runner.device import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    checkpoint = load_checkpoint(args.model)
    workload = workload_from_args(args, args.vocab_size or checkpoint.arch.vocab_size, checkpoint.tokenizer)
    requests = workload.requests(args.num_prompts, args.seed)
    if any(isinstance(r.prompt, str) for r in requests):
        tokenizer = checkpoint.tokenizer
        requests = [BenchRequest(tokenizer.encode(r.prompt), r.prompt_len, r.output_len) for r in requests]
    warmup = workload.requests(min(4, len(requests)), args.seed + 1)

    llm = LLM.from_checkpoint(
        checkpoint,
        dtype=dtype_name,
        device=str(device),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        enable_prefix_caching=not args.no_prefix_caching,
        **kernel_options(args),
        **precision_options(args),
    )
    ours = AdaptserveRunner(llm)
    ours.run(warmup)  # first calls pay for allocation and kernel choice
    elapsed = {"adaptserve": [ours.run(requests) for _ in tqdm(range(args.rounds), desc="adaptserve")]}
    del llm, ours
    free_memory(device)  # our weights and KV cache leave before transformers' arrive
    variants = parse_baselines(args.baselines)
    hf_requests = requests[: args.hf_num_prompts]
    if variants:
        model = transformers_model(checkpoint, dtype, device)
        for variant in variants:
            runner = TransformersRunner(
                TransformersGenerator(model, variant), hf_requests, args.hf_max_batch_size
            )
            runner.warm_up(hf_requests)
            name = f"transformers-{variant}"
            elapsed[name] = [runner.run(hf_requests) for _ in tqdm(range(args.rounds), desc=name)]
        del model
        free_memory(device)
    results = [
        _result(name, dtype_name, samples, requests if name == "adaptserve" else hf_requests)
        for name, samples in elapsed.items()
    ]
    for r in results:
        print(_row(r))
    payload = {
        "model": args.model or DEFAULT_MODEL_LABEL,
        "workload": {**workload.describe(), "num_prompts": args.num_prompts, "seed": args.seed},
        "engine_options": {
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "prefix_caching": not args.no_prefix_caching,
        },
        "hf_max_batch_size": args.hf_max_batch_size,
        "rounds": args.rounds,
        "results": [asdict(r) for r in results],
    }
    path = write_results(
        "offline", device, payload, args.result_dir, command=getattr(args, "command_line", None)
    )
    print(f"wrote {path}")
    print(markdown_table(results))
    from adaptserve.bench.plot import plot_after_run

    plot_after_run(path)
    return results


def _result(engine: str, dtype: str, samples: list[float], requests: list[BenchRequest]) -> OfflineResult:
    elapsed = statistics.median(samples)
    num_out = sum(r.output_len for r in requests)
    num_total = num_out + sum(r.prompt_len for r in requests)
    return OfflineResult(
        engine,
        dtype,
        round(len(requests) / elapsed, 3),
        round(num_out / elapsed, 2),
        round(num_total / elapsed, 2),
        round(elapsed, 6),
        [round(s, 6) for s in samples],
        len(requests),
    )


def _row(r: OfflineResult) -> str:
    return (
        f"{r.engine:>20} {r.dtype:>9}: {r.throughput_output_tok_s:9.1f} output tok/s, "
        f"{r.request_throughput:7.2f} req/s ({r.elapsed_s:.1f} s, {r.num_prompts} prompts)"
    )


def markdown_table(results: list[OfflineResult]) -> str:
    lines = [
        "| engine | dtype | prompts | output tok/s | total tok/s | req/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.engine} | {r.dtype} | {r.num_prompts} | {r.throughput_output_tok_s:.1f} | "
        f"{r.throughput_total_tok_s:.1f} | {r.request_throughput:.2f} |"
        for r in results
    ]
    return "\n".join(lines)
