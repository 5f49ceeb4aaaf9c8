"""Command-line flags of speculative decoding, shared by `serve`, `generate` and the benchmarks."""

from __future__ import annotations

import argparse

from adaptserve.config import SPEC_METHODS


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding")
    group.add_argument(
        "--speculative-method", default="off", choices=SPEC_METHODS, help="drafter; off = no speculation"
    )
    group.add_argument(
        "--num-speculative-tokens", type=int, default=4, help="most drafts per sequence and step"
    )
    group.add_argument(
        "--speculative-model",
        default=None,
        help="draft: a draft model with the target's tokenizer (.gguf file, Hugging Face folder, preset)",
    )
    group.add_argument("--prompt-lookup-min", type=int, default=1, help="ngram: shortest suffix to look up")
    group.add_argument("--prompt-lookup-max", type=int, default=4, help="ngram: longest suffix to look up")
    group.add_argument(
        "--fixed-speculation",
        action="store_true",
        help="always draft --num-speculative-tokens (default: adapt k, 0 = off, to acceptance and load)",
    )


def spec_options(args: argparse.Namespace) -> dict:
    """EngineConfig.from_flat keywords from the flags (defaults when a parser lacks them)."""
    return {
        "spec_method": getattr(args, "speculative_method", "off"),
        "num_speculative_tokens": getattr(args, "num_speculative_tokens", 4),
        "draft_model": getattr(args, "speculative_model", None),
        "prompt_lookup_min": getattr(args, "prompt_lookup_min", 1),
        "prompt_lookup_max": getattr(args, "prompt_lookup_max", 4),
        "spec_adaptive": not getattr(args, "fixed_speculation", False),
    }
