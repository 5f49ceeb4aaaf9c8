"""Command-line flags of KV-cache compression, shared by `serve`, `generate` and the benchmarks."""

from __future__ import annotations

import argparse


def add_kv_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KV-cache compression")
    group.add_argument(
        "--kv-format",
        default="bf16",
        choices=["bf16", "fp8", "int8", "int4k", "int4"],
        help="format KV blocks are written in (bf16 = the model's dtype; int4k = int4 keys per channel: "
        "new tokens go to int8, full cold blocks are requantized into int4k)",
    )
    group.add_argument(
        "--kv-policy",
        default="static",
        choices=["static", "adaptive"],
        help="adaptive: lower the format under memory pressure, within the error budget",
    )
    group.add_argument(
        "--kv-ladder",
        default="bf16,int8,int4",
        help="adaptive: formats, high to low (per-channel int4 keys: add int4k, e.g. bf16,int8,int4k,int4)",
    )
    group.add_argument(
        "--kv-error-budget",
        type=float,
        default=0.05,
        help="adaptive: most attention-output error of a format",
    )
    group.add_argument(
        "--kv-hot-window",
        type=int,
        default=None,
        metavar="N",
        help="write new tokens in bf16 at every format and keep each sequence's newest N blocks bf16; "
        "only colder blocks are requantized (0 = off; default: 1 with --kv-policy adaptive, else 0)",
    )


def kv_options(args: argparse.Namespace) -> dict:
    """EngineConfig.from_flat keywords from the flags (defaults when a parser lacks them)."""
    return {
        "kv_format": getattr(args, "kv_format", "bf16"),
        "kv_policy": getattr(args, "kv_policy", "static"),
        "kv_ladder": tuple(getattr(args, "kv_ladder", "bf16,int8,int4").split(",")),
        "kv_error_budget": getattr(args, "kv_error_budget", 0.05),
        "kv_hot_window": getattr(args, "kv_hot_window", None),
    }
