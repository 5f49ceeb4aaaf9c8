"""Scoring passes (bench/runner_scoring.py) run the whole model in the engine's fixed precision, the
LM head included when it is quantized."""

import torch

from adaptserve import LLM
from adaptserve.bench.runner_scoring import score_sequences

SEQUENCES = [[300 + i for i in range(20)], [400 + 3 * i for i in range(12)]]


def _scores(**options):
    llm = LLM("tiny", device="cpu", kv_cache_memory_gib=0.05, enable_prefix_caching=False, **options)
    return score_sequences(llm.engine.runner, SEQUENCES, forward_tokens=64)


def test_a_quantized_lm_head_takes_part_in_scoring():
    body_only = _scores(precision_policy="int4")
    with_head = _scores(precision_policy="int4", quantize_lm_head=True)
    again = _scores(precision_policy="int4", quantize_lm_head=True)
    for (_, nll), (_, head_nll), (_, again_nll) in zip(body_only, with_head, again, strict=True):
        assert torch.equal(head_nll, again_nll)  # deterministic: a difference below is the head's
        assert not torch.equal(nll, head_nll)
        torch.testing.assert_close(nll, head_nll, atol=0.5, rtol=0.1)  # close: the same model
