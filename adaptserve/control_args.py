"""Command-line flags of the adaptive control plane, shared by `serve`, `generate` and the benchmarks."""

from __future__ import annotations

import argparse

from adaptserve.config import CONTROLLERS, ConfigError


def add_control_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adaptive control")
    group.add_argument(
        "--adaptive",
        default="",
        metavar="NAMES",
        help=f"controllers that change knobs while serving, comma-separated: {', '.join(CONTROLLERS)}",
    )
    group.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT objective the controllers keep, s")
    group.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT objective the controllers keep, s")
    group.add_argument("--control-interval", type=float, default=0.25, help="seconds between decision rounds")


def control_options(args: argparse.Namespace) -> dict:
    """EngineConfig.from_flat keywords from the flags (defaults when a parser lacks them)."""
    names = tuple(n.strip() for n in getattr(args, "adaptive", "").split(",") if n.strip())
    unknown = [n for n in names if n not in CONTROLLERS]
    if unknown:
        raise ConfigError(f"--adaptive: unknown controller(s) {unknown}; known: {', '.join(CONTROLLERS)}")
    return {
        "controllers": names,
        "tpot_slo_s": getattr(args, "slo_tpot", 0.1),
        "ttft_slo_s": getattr(args, "slo_ttft", 2.0),
        "control_interval_s": getattr(args, "control_interval", 0.25),
    }
