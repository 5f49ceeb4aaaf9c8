"""Command-line flags of the GPU fast path (attention backend, CUDA graphs, autotuning, pins, async
scheduling), shared by `serve`, `generate` and the benchmarks."""

from __future__ import annotations

import argparse

from adaptserve.config import ATTENTION_BACKENDS, AUTOTUNE_MODES

ASYNC_SCHEDULING = {"auto": None, "on": True, "off": False}  # flag value -> SchedulerConfig value


def add_kernel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("kernels")
    group.add_argument(
        "--attention-backend",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="auto: the registry's tuned choice (Triton on CUDA), or force one family",
    )
    group.add_argument("--no-cuda-graphs", action="store_true", help="launch decode steps eagerly")
    group.add_argument("--cuda-graph-max-batch", type=int, default=None, help="default: --max-num-seqs")
    group.add_argument(
        "--cuda-graph-pieces",
        type=int,
        default=1,
        help="CUDA graphs per decode step, each over a group of layers (the device starts on the first "
        "while the host launches the rest)",
    )
    group.add_argument(
        "--cuda-graph-prompt-tokens",
        type=int,
        default=64,
        help="prompt chunks of at most this many tokens (after a prefix-cache hit) replay the decode "
        "graphs as one-token rows; 0: prompts always run eagerly",
    )
    group.add_argument(
        "--autotune",
        default="cache",
        choices=AUTOTUNE_MODES,
        help="cache: reuse saved kernel choices; online: also time variants while serving and swap",
    )
    group.add_argument("--kernel-cache", default=None, help="file of saved kernel choices")
    group.add_argument(
        "--pin-kernel",
        action="append",
        default=[],
        metavar="OP=VARIANT",
        help="force a kernel variant, e.g. decode_attention=torch_ref (repeatable; "
        "`adaptserve kernels` lists them)",
    )
    group.add_argument(
        "--async-scheduling",
        default="auto",
        choices=ASYNC_SCHEDULING,
        help="schedule and launch step n+1 before step n's tokens reach the host (auto: on CUDA)",
    )


def kernel_options(args: argparse.Namespace) -> dict:
    """EngineConfig.from_flat keywords from the flags (defaults when a parser lacks them)."""
    return {
        "attention_backend": getattr(args, "attention_backend", "auto"),
        "cuda_graphs": not getattr(args, "no_cuda_graphs", False),
        "cuda_graph_max_batch": getattr(args, "cuda_graph_max_batch", None),
        "cuda_graph_pieces": getattr(args, "cuda_graph_pieces", 1),
        "cuda_graph_prompt_tokens": getattr(args, "cuda_graph_prompt_tokens", 64),
        "autotune": getattr(args, "autotune", "cache"),
        "kernel_cache": getattr(args, "kernel_cache", None),
        "pins": tuple(getattr(args, "pin_kernel", None) or ()),
        "async_scheduling": ASYNC_SCHEDULING[getattr(args, "async_scheduling", "auto")],
    }


def precision_options(args: argparse.Namespace) -> dict:
    """EngineConfig.from_flat weight-precision keywords from the flags (defaults when a parser lacks them)."""
    return {
        "precision_policy": getattr(args, "precision_policy", "native"),
        "weight_formats": tuple(f for f in (getattr(args, "weight_formats", "") or "").split(",") if f),
        "quantize_lm_head": getattr(args, "quantize_lm_head", False),
    }
