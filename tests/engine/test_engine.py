"""LLMEngine on the tiny random preset: n > 1 siblings folded into one output; errors inside a step."""

import pytest

from adaptserve import LLM, SamplingParams


def test_n_siblings_finishing_in_the_same_step_give_one_output():
    """All children hit max_tokens in the same step; the first to be processed used to release the
    parent and the second then failed with a KeyError."""
    llm = LLM("tiny", max_model_len=64, num_blocks=16)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=4)
    outputs = llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False)
    assert [o.request_id for o in outputs] == ["0", "1"]
    for output in outputs:
        assert [c.index for c in output.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 4 and c.finish_reason == "length" for c in output.outputs)
        assert len({tuple(c.token_ids) for c in output.outputs}) == 3  # seeds 5, 6, 7
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache.num_free_blocks == 16


def test_an_error_inside_a_step_frees_the_batch_and_the_engine_still_works(monkeypatch):
    llm = LLM("tiny", num_blocks=32, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    expected = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    runner = llm.engine.runner
    real_launch = runner.launch
    monkeypatch.setattr(runner, "launch", lambda out: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache.num_free_blocks == 32
    monkeypatch.setattr(runner, "launch", real_launch)
    assert llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids == expected
