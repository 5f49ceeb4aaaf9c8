"""Speculation on a GPU: verify steps replay decode graphs captured for longer contexts (never a
capture of their own) and give the tokens that eager decoding gives."""

import pytest

from adaptserve import LLM, SamplingParams
from tests.runner.test_graph_prewarm import tiny_checkpoint

pytestmark = pytest.mark.cuda

# repeated runs, so prompt lookup finds drafts; contexts stay far below the warm-up's 1024
PROMPTS = [[5, 6, 7, 8, 9] * 6, [11, 12, 13] * 9, [20 + i for i in range(12)] * 2]
PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
OPTIONS = {"dtype": "float32", "device": "cuda", "num_blocks": 64, "max_num_seqs": 8}
SPEC = {"spec_method": "ngram", "num_speculative_tokens": 4, "spec_adaptive": False}


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def test_verify_steps_replay_longer_context_graphs_like_eager():
    checkpoint = tiny_checkpoint()
    plain = tokens(LLM.from_checkpoint(checkpoint, cuda_graphs=False, **OPTIONS))
    eager = tokens(LLM.from_checkpoint(checkpoint, cuda_graphs=False, **OPTIONS, **SPEC))
    llm = LLM.from_checkpoint(checkpoint, **OPTIONS, **SPEC)
    graphs = llm.engine.runner.graphs
    assert graphs is not None
    verify_sizes = {graphs.bucket(r) for r in range(5, 16)}  # 8 and 16: plain steps here run <= 3 rows
    captured = {key for key in graphs.graphs if key[0] in verify_sizes}
    spec = tokens(llm)
    assert spec == eager == plain
    # verify steps captured nothing: their sizes hold only the warm-up's graphs
    assert {key for key in graphs.graphs if key[0] in verify_sizes} == captured
