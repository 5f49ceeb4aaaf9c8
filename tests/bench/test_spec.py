"""bench spec's pieces that need no model: argument checks and the adaptive trace's coding."""

import argparse

import pytest

from adaptserve.bench.spec import _arm_runs, add_spec_bench_args, base_engine_options, run_spec_benchmark
from adaptserve.cli import build_parser
from adaptserve.config import EngineConfig
from adaptserve.engine.stats import StepStats


def _step(num_decode_sequences: int, drafter: str = "", draft_len: int = 0) -> StepStats:
    n = num_decode_sequences
    return StepStats(0.0, 0.001, n, 0, n, n, 0, 0, 0, drafter=drafter, draft_len=draft_len)


def test_arm_runs_code_the_policy_choices_run_by_run():
    steps = [_step(4, "ngram", 4), _step(4, "ngram", 4), _step(3, "ngram", 4), _step(3), _step(3)]
    assert _arm_runs(steps) == [[4, "ngram 4", 2], [3, "ngram 4", 1], [3, "off", 2]]


def test_warm_passes_below_one_is_refused_before_loading_a_model():
    parser = argparse.ArgumentParser()
    add_spec_bench_args(parser)
    args = parser.parse_args(["--warm-passes", "0"])
    args.model, args.device, args.dtype = "/no/such/model.gguf", "cpu", None
    with pytest.raises(ValueError, match="--warm-passes must be at least 1"):
        run_spec_benchmark(args)


def test_every_setting_gets_the_kernel_and_precision_flags():
    """The engine flags reach each setting's engine (they were once dropped: a diagnosis run with
    --no-cuda-graphs still replayed graphs)."""
    argv = ["bench", "spec", "--device", "cpu", "--no-cuda-graphs", "--cuda-graph-pieces", "3"]
    argv += ["--async-scheduling", "off", "--precision-policy", "bf16"]
    options = base_engine_options(build_parser().parse_args(argv), on_gpu=False)
    config = EngineConfig.from_flat(**options)
    assert not config.kernels.cuda_graphs and config.kernels.cuda_graph_pieces == 3
    assert config.scheduler.async_scheduling is False
    assert config.precision.precision_policy == "bf16"
    assert options["kv_cache_memory_gib"] == 1.0 and options["device"] == "cpu"
