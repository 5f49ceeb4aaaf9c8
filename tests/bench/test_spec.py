"""bench spec's pieces that need no model: argument checks and the adaptive trace's coding."""

import argparse

import pytest

from adaptserve.bench.spec import (
    _arm_runs,
    _median_pass,
    add_spec_bench_args,
    base_engine_options,
    build_engine,
    grounded_conversations,
    run_setting,
    run_spec_benchmark,
    waves_of,
)
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


def test_batch_one_runs_each_prompt_alone_and_others_run_together():
    conversations = grounded_conversations(3)
    assert waves_of(conversations, 1) == [[c] for c in conversations]
    assert waves_of(conversations, 3) == [conversations]


def test_a_pass_of_waves_counts_every_wave(smollm2):
    """Batch 1 runs its prompts one after another: the row sums their tokens and steps, and its
    decode time spans each wave's decoding, not the gaps or prompts between them."""
    waves = waves_of(grounded_conversations(2), 1)
    llm = build_engine(smollm2, waves, 6, {"kv_cache_memory_gib": 0.1, "max_model_len": 1024})
    row, token_ids = run_setting(llm, waves, 6)
    alone = [run_setting(llm, [wave], 6)[0] for wave in waves]
    assert len(token_ids) == 2 and row["generated_tokens"] == sum(len(t) for t in token_ids) == 12
    assert row["forward_passes"] == sum(r["forward_passes"] for r in alone)
    # 5 decode steps after each prompt's step, each sequence one pass per token
    assert row["passes_per_token_per_seq"] == 1.0
    assert 0 < row["decode_tokens_per_s"] < float("inf") and row["seconds"] > 0
    # the two prompt steps and the longest step lie within the pass
    assert 0 < row["prompt_steps_ms"] < 1e3 * row["seconds"]
    assert 0 < row["longest_step_ms"] <= 1e3 * row["seconds"]
    assert row["graph_captures"] == 0  # no graphs on the CPU


def test_the_median_pass_keeps_every_pass_beside_it():
    rows = [
        {"tokens_per_s": tps, "longest_step_ms": longest, "graph_captures": captures}
        for tps, longest, captures in ((90.0, 40.0, 1), (120.0, 2.0, 0), (100.0, 3.0, 0))
    ]
    row = _median_pass([(r, [[1]]) for r in rows])
    assert row["tokens_per_s"] == 100.0 and row["longest_step_ms"] == 3.0
    assert row["tokens_per_s_passes"] == [90.0, 120.0, 100.0]  # in the order the passes ran
    assert row["longest_step_ms_passes"] == [40.0, 2.0, 3.0] and row["graph_captures_passes"] == [1, 0, 0]
