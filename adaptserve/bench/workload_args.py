"""Command-line flags that pick a workload (shared by `bench serve` and `bench offline`), with vLLM's
names where vLLM has the same thing."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaptserve.bench.trace import TraceWorkload
from adaptserve.bench.workloads import (
    MixedLengthWorkload,
    RandomWorkload,
    SharedPrefixChatWorkload,
    ShareGPTShapedWorkload,
)

DATASETS = ("sharegpt-synth", "random", "shared-prefix", "mixed", "trace")


def add_workload_args(parser: argparse.ArgumentParser, default_dataset: str = "sharegpt-synth") -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--dataset-name", default=default_dataset, choices=DATASETS)
    group.add_argument(
        "--dataset-path", default=None, help="trace file (JSON Lines) for --dataset-name trace"
    )
    group.add_argument("--num-prompts", type=int, default=1000, help="requests per run")
    group.add_argument("--random-input-len", type=int, default=1024)
    group.add_argument("--random-output-len", type=int, default=128)
    group.add_argument("--random-range-ratio", type=float, default=0.0)
    group.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: system prompt tokens")
    group.add_argument("--turns", type=int, default=4, help="shared-prefix: turns per conversation")
    group.add_argument("--concurrent-sessions", type=int, default=8, help="shared-prefix: sessions at once")
    group.add_argument("--long-fraction", type=float, default=0.1, help="mixed: share of long prompts")
    group.add_argument("--long-min-len", type=int, default=8192)
    group.add_argument("--long-max-len", type=int, default=16384)
    group.add_argument(
        "--tokenizer",
        default=None,
        help="GGUF file, HF folder or preset whose vocabulary bounds the random ids (and counts text); "
        "default: the embedded SmolLM2",
    )
    group.add_argument("--vocab-size", type=int, default=None, help="bound random ids without a tokenizer")
    group.add_argument("--seed", type=int, default=0)


def load_tokenizer(spec: str | None):
    """(tokenizer or None, vocab size) from a GGUF file, HF folder, preset name or the embedded model,
    without loading any weights."""
    from adaptserve.model.config import PRESETS
    from adaptserve.model.loaders import default_model_path
    from adaptserve.model.tokenizer import Tokenizer

    if spec in PRESETS:
        return None, PRESETS[spec].vocab_size
    path = Path(spec or default_model_path()).expanduser()
    if path.is_dir():
        tokenizer = Tokenizer.from_hf_folder(path)
    elif path.is_file():
        tokenizer = Tokenizer.from_gguf(path)
    else:
        raise ValueError(f"--tokenizer {spec!r}: no such file, folder or preset")
    return tokenizer, tokenizer.vocab_size


def workload_from_args(args: argparse.Namespace, vocab_size: int, tokenizer=None):
    """The workload the flags describe; errors name the flag."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    name = args.dataset_name
    if name == "random":
        return RandomWorkload(
            vocab_size, args.random_input_len, args.random_output_len, args.random_range_ratio
        )
    if name == "sharegpt-synth":
        return ShareGPTShapedWorkload(vocab_size)
    if name == "shared-prefix":
        return SharedPrefixChatWorkload(
            vocab_size, args.prefix_len, args.turns, concurrent_sessions=args.concurrent_sessions
        )
    if name == "mixed":
        return MixedLengthWorkload(vocab_size, args.long_fraction, args.long_min_len, args.long_max_len)
    if not args.dataset_path:
        raise ValueError("--dataset-name trace needs --dataset-path FILE (JSON Lines)")
    count = (lambda text: len(tokenizer.encode(text))) if tokenizer is not None else None
    return TraceWorkload(args.dataset_path, vocab_size, count_tokens=count)
