"""How many decode rows the CUDA graphs cover: with speculation, a verify step's k + 1 rows per
sequence, so verify steps replay graphs too (pure config arithmetic; runs on the CPU)."""

from adaptserve.config import EngineConfig
from adaptserve.runner.cuda_graphs import MAX_DEFAULT_GRAPH_ROWS, graph_rows_default


def config(**flat) -> EngineConfig:
    return EngineConfig.from_flat(**flat)


def test_without_speculation_the_graphs_cover_max_num_seqs():
    assert graph_rows_default(config(max_num_seqs=48)) == 48


def test_speculation_covers_every_verify_row_up_to_the_cap():
    assert graph_rows_default(config(max_num_seqs=16, spec_method="ngram", num_speculative_tokens=4)) == 80
    big = config(max_num_seqs=256, spec_method="ngram", num_speculative_tokens=8)
    assert graph_rows_default(big) == MAX_DEFAULT_GRAPH_ROWS == 512  # not 256 * 9


def test_the_token_budget_bounds_the_rows_but_never_below_max_num_seqs():
    tight = config(max_num_seqs=32, max_num_batched_tokens=64, spec_method="ngram", num_speculative_tokens=8)
    assert graph_rows_default(tight) == 64
    tiny_budget = config(max_num_seqs=32, max_num_batched_tokens=32, spec_method="ngram")
    assert graph_rows_default(tiny_budget) == 32
