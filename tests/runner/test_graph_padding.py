"""A shrinking batch inside one graph bucket, with async scheduling: every step's tokens are pending
(the host holds a placeholder, the device the real id), and as sequences finish, rows that held a
pending token become padded rows of the same bucket. On the H100 padded rows once read that
placeholder (-1) from the pinned input mirror and the embedding lookup hit a device-side assert
(the KV ramp and the spec bench at batch 32; fixed in 49c2d05). Replayed steps must run and match
eager decoding token for token."""

import pytest

from adaptserve import LLM, SamplingParams
from tests.runner.test_graph_prewarm import OPTIONS, tiny_checkpoint

pytestmark = pytest.mark.cuda

# 12 sequences (bucket 12) finishing one per step: batches 12, 11, ..., 9 pad up to 12, then smaller
# buckets; every decode row's input is pending with async scheduling on CUDA
PROMPTS = [[3 + i] * (5 + i) for i in range(12)]
PARAMS = [SamplingParams(temperature=0.0, max_tokens=4 + i, ignore_eos=True) for i in range(12)]


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def test_padded_rows_of_a_shrinking_batch_replay_like_eager():
    checkpoint = tiny_checkpoint()
    options = {**OPTIONS, "max_num_seqs": 16}
    expected = tokens(LLM.from_checkpoint(checkpoint, cuda_graphs=False, **options))
    llm = LLM.from_checkpoint(checkpoint, **options)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and 12 in graphs.sizes and 11 not in graphs.sizes
    assert llm.engine.config.scheduler.async_scheduling is not False
    for _ in range(3):  # the mirrors take turns: every padded row meets one that held a placeholder
        assert tokens(llm) == expected
    assert 12 in graphs.last_used


def test_a_capture_after_pending_rows_warms_up_on_valid_inputs():
    """A graph captured after steps whose rows held pending tokens (the prewarm controller and the
    on-demand capture do this while serving): its eager warm-up reads every row of its bucket, so no
    row of the static buffers may keep a placeholder (the 8B KV ramp aborted at its first captures)."""
    checkpoint = tiny_checkpoint()
    options = {**OPTIONS, "max_num_seqs": 16}
    expected = tokens(LLM.from_checkpoint(checkpoint, cuda_graphs=False, **options))
    llm = LLM.from_checkpoint(checkpoint, **options)
    graphs = llm.engine.runner.graphs
    assert tokens(llm) == expected  # rows 0-11 held pending tokens, then the batch shrank to 1
    assert (graphs.input_ids >= 0).all()
    graphs.graphs.clear()  # every bucket is captured again, on demand, over those buffers
    assert tokens(llm) == expected
    assert graphs.graphs
