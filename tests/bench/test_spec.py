"""bench spec's pieces that need no model: argument checks and the adaptive trace's coding."""

import argparse

import pytest

from adaptserve.bench.spec import _arm_runs, add_spec_bench_args, run_spec_benchmark
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
