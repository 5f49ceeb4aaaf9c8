"""Sampling on the real SmolLM2-135M-Instruct (float32): seeds that hold in any batch, n > 1 sharing the
prompt's KV blocks, stop strings and stop ids, max_tokens, ignore_eos, logprobs, repetition penalty."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from adaptserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def llm(smollm2) -> LLM:
    # a small KV cache: the default 2 GiB takes seconds to allocate on CPU and these prompts are short
    return LLM.from_checkpoint(smollm2, dtype="float32", max_model_len=512, num_blocks=96)


@pytest.fixture(scope="module")
def france_ids(llm) -> list[int]:
    tok = llm.tokenizer
    return tok.encode(tok.apply_chat_template(FRANCE, add_generation_prompt=True), add_special_tokens=False)


@pytest.fixture(scope="module")
def france_greedy(llm, france_ids):
    """The greedy answer with top-3 logprobs: 'The capital of France is Paris.' then EOS."""
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=3)
    out = llm.generate(france_ids, params, use_tqdm=False)[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop" and out.stop_reason is None  # EOS, not a stop string or stop id
    assert out.token_ids[-1] in llm.tokenizer.eos_token_ids
    return out


def _assert_idle(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.runner.num_blocks


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


# ---------------------------------------------------------------------------------------------------
# Seeds


SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
SEEDED_PROMPT = "Write one sentence about a lighthouse keeper:"
OTHERS = [
    ("The capital of France is", SamplingParams(temperature=0.0, max_tokens=12)),
    ("def fibonacci(n):", SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True)),
    ("Once upon a time", SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, ignore_eos=True)),
    ("1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=6, repetition_penalty=1.2)),
    ("Here is a list of fruits: apple,", SamplingParams(temperature=0.7, top_k=20, seed=99, max_tokens=10)),
    ("A haiku about rain:", SamplingParams(temperature=1.2, min_p=0.05, max_tokens=16, ignore_eos=True)),
]


def test_seeded_request_is_the_same_alone_and_anywhere_in_a_batch(llm):
    alone = _tokens(llm, SEEDED_PROMPT, SEEDED)[0]
    assert len(alone) == 12

    prompts = [SEEDED_PROMPT] + [p for p, _ in OTHERS]
    params = [SEEDED] + [s for _, s in OTHERS]
    first = _tokens(llm, prompts, params)
    assert first[0] == alone

    # the seeded request fifth, the others in reverse order
    reordered = list(reversed(OTHERS))
    prompts = [p for p, _ in reordered[:4]] + [SEEDED_PROMPT] + [p for p, _ in reordered[4:]]
    params = [s for _, s in reordered[:4]] + [SEEDED] + [s for _, s in reordered[4:]]
    fifth = _tokens(llm, prompts, params)
    assert fifth[4] == alone

    # the seed is what fixes it: another seed samples another sentence
    other_seed = SamplingParams(temperature=0.8, top_p=0.95, seed=4321, max_tokens=12, ignore_eos=True)
    assert _tokens(llm, SEEDED_PROMPT, other_seed)[0] != alone
    _assert_idle(llm)


# ---------------------------------------------------------------------------------------------------
# n > 1


def test_n2_children_share_the_prompt_blocks_and_differ(llm):
    prompt = llm.tokenizer.encode(
        "Name three colours of the rainbow and say something about each one of them, briefly please:"
    )
    num_shared_blocks = (len(prompt) - 1) // BLOCK_SIZE  # the last prompt token is always computed
    assert num_shared_blocks >= 1
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    hits_before = llm.engine.kv_cache.prefix_cache_hits

    llm.engine.add_request("n2", prompt, params)
    llm.engine.step()  # both children prefill in one step; the second finds the first's full blocks
    first_blocks = llm.engine.kv_cache.get_block_ids("n2-0")
    second_blocks = llm.engine.kv_cache.get_block_ids("n2-1")
    assert first_blocks[:num_shared_blocks] == second_blocks[:num_shared_blocks]
    assert set(first_blocks[num_shared_blocks:]).isdisjoint(second_blocks[num_shared_blocks:])
    assert llm.engine.kv_cache.prefix_cache_hits - hits_before == num_shared_blocks * BLOCK_SIZE

    finished = []
    while llm.engine.has_unfinished_requests():
        finished += llm.engine.step()
    assert len(finished) == 1 and finished[0].request_id == "n2"
    output = finished[0]
    assert output.num_cached_tokens == 0  # the first child computed the prompt itself
    assert [c.index for c in output.outputs] == [0, 1]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in output.outputs)
    assert output.outputs[0].token_ids != output.outputs[1].token_ids
    # both children finished in the same step; each got its own text
    for completion in output.outputs:
        assert completion.text and completion.text == llm.tokenizer.decode(completion.token_ids)
    _assert_idle(llm)

    # child i is seeded with seed + i, so the same request gives the same pair again
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in output.outputs]
    assert again.num_cached_tokens == num_shared_blocks * BLOCK_SIZE  # now from the prefix cache


# ---------------------------------------------------------------------------------------------------
# Stopping


def test_stop_string_is_cut_from_the_text(llm, france_ids, france_greedy):
    out = llm.generate(
        france_ids, SamplingParams(temperature=0.0, max_tokens=24, stop=["Paris"]), use_tqdm=False
    )
    completion = out[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == "Paris"
    assert completion.text == "The capital of France is "
    assert "Paris" not in completion.text
    # generation stopped at the token that completed the match
    assert completion.token_ids == france_greedy.token_ids[: len(completion.token_ids)]
    assert "Paris" in llm.tokenizer.decode(completion.token_ids)
    assert "Paris" not in llm.tokenizer.decode(completion.token_ids[:-1])


def test_stop_string_kept_with_include_stop_str_in_output(llm, france_ids):
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=["Paris"], include_stop_str_in_output=True)
    completion = llm.generate(france_ids, params, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == "Paris"
    assert completion.text == "The capital of France is Paris"


def test_first_of_several_stop_strings_to_appear_wins(llm, france_ids):
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=["Paris", "capital"])
    completion = llm.generate(france_ids, params, use_tqdm=False)[0].outputs[0]
    assert completion.stop_reason == "capital" and completion.text == "The "


def test_stop_token_id_ends_the_output_on_that_token(llm, france_ids, france_greedy):
    greedy = france_greedy.token_ids
    stop_at = 3
    stop_id = greedy[stop_at]
    assert stop_id not in greedy[:stop_at]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id])
    completion = llm.generate(france_ids, params, use_tqdm=False)[0].outputs[0]
    assert completion.token_ids == greedy[: stop_at + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_id


def test_max_tokens_ends_with_length(llm, france_ids, france_greedy):
    completion = llm.generate(france_ids, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)[
        0
    ].outputs[0]
    assert completion.token_ids == france_greedy.token_ids[:3]
    assert completion.finish_reason == "length" and completion.stop_reason is None


def test_ignore_eos_runs_past_eos_to_max_tokens(llm, france_ids, france_greedy):
    num_answer = len(france_greedy.token_ids)  # the answer, EOS included
    max_tokens = num_answer + 4
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    completion = llm.generate(france_ids, params, use_tqdm=False)[0].outputs[0]
    assert len(completion.token_ids) == max_tokens and completion.finish_reason == "length"
    assert completion.token_ids[:num_answer] == france_greedy.token_ids


def test_min_tokens_blocks_an_early_eos(llm, france_ids, france_greedy):
    """Before min_tokens, EOS cannot be sampled (as in vLLM): the greedy answer's EOS is replaced."""
    num_answer = len(france_greedy.token_ids)  # EOS is its last token
    eos = france_greedy.token_ids[-1]
    params = SamplingParams(temperature=0.0, max_tokens=num_answer + 6, min_tokens=num_answer + 1)
    completion = llm.generate(france_ids, params, use_tqdm=False)[0].outputs[0]
    assert len(completion.token_ids) >= num_answer + 1
    assert eos not in completion.token_ids[: num_answer + 1]
    assert completion.token_ids[: num_answer - 1] == france_greedy.token_ids[:-1]


# ---------------------------------------------------------------------------------------------------
# Logprobs


def test_greedy_logprobs_hold_the_sampled_token_as_the_best(france_greedy):
    assert len(france_greedy.logprobs) == len(france_greedy.token_ids)
    for token_id, entry in zip(france_greedy.token_ids, france_greedy.logprobs, strict=True):
        assert token_id in entry
        assert 3 <= len(entry) <= 4  # the top 3, plus the sampled token when it is not among them
        assert all(lp <= 0 for lp in entry.values())
        assert entry[token_id] == max(entry.values())
        assert sum(math.exp(lp) for lp in entry.values()) <= 1 + 1e-5
    expected = sum(lp[t] for lp, t in zip(france_greedy.logprobs, france_greedy.token_ids, strict=True))
    assert france_greedy.cumulative_logprob == pytest.approx(expected)
    assert france_greedy.cumulative_logprob < 0


def test_sampled_logprobs_include_the_sampled_token(llm, france_ids, france_greedy):
    params = [
        SamplingParams(temperature=1.5, seed=3, max_tokens=12, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=4, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=4),
    ]
    sampled, only_sampled, without = (
        o.outputs[0] for o in llm.generate([france_ids] * 3, params, use_tqdm=False)
    )
    for token_id, entry in zip(sampled.token_ids, sampled.logprobs, strict=True):
        assert token_id in entry and 3 <= len(entry) <= 4
        assert all(lp <= 0 for lp in entry.values())
    # logprobs come from the raw logits, so the same prefix gives the same top-3 as the greedy run
    assert sampled.logprobs[0].keys() - {sampled.token_ids[0]} <= france_greedy.logprobs[0].keys()
    assert [list(e) for e in only_sampled.logprobs] == [[t] for t in only_sampled.token_ids]
    assert only_sampled.logprobs[0][only_sampled.token_ids[0]] == pytest.approx(
        france_greedy.logprobs[0][france_greedy.token_ids[0]], abs=1e-4
    )
    assert without.logprobs is None and without.cumulative_logprob is None


# ---------------------------------------------------------------------------------------------------
# Repetition penalty


def _max_trigram_count(token_ids: list[int]) -> int:
    return max(Counter(zip(token_ids, token_ids[1:], token_ids[2:], strict=False)).values())


def test_repetition_penalty_breaks_a_greedy_loop(llm):
    prompt = "I like cats. I like cats. I like cats."
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    penalised = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3)
    looping, varied = _tokens(llm, [prompt, prompt], [plain, penalised])
    assert _max_trigram_count(looping) >= 3  # " I'm a cat." over and over
    assert varied != looping
    assert _max_trigram_count(varied) < _max_trigram_count(looping)
    # alone it gives the same tokens as beside the unpenalised row
    assert _tokens(llm, prompt, penalised)[0] == varied
