"""Async scheduling (step n+1 scheduled and launched before step n's tokens reach the host) gives
the same outputs as the synchronous engine: greedy and seeded sampling, stop tokens, max_tokens,
penalties, logprobs, min_tokens, preemption, aborts, a reused request id and streamed stop strings.

On the CPU nothing overlaps (torch computes as it is called), but the bookkeeping is the same as on
CUDA: pending tokens are placeholders that the runner fills from the previous step's sampled ids."""

import pytest

from adaptserve import LLM, SamplingParams
from adaptserve.engine.outputs import PENDING_TOKEN_ID

PROMPTS = [[5, 6, 7], [8, 9], list(range(10, 40)), [41] * 17]


def tiny(async_scheduling: bool, **options) -> LLM:
    options = {"num_blocks": 64, "max_model_len": 256, "enable_prefix_caching": False, **options}
    return LLM("tiny", async_scheduling=async_scheduling, **options)


def token_ids(outputs) -> list[list[tuple[int, ...]]]:
    return [[tuple(c.token_ids) for c in o.outputs] for o in outputs]


def generate_both(params, prompts=PROMPTS, **options):
    sync, overlapped = tiny(False, **options), tiny(True, **options)
    expected = sync.generate(prompts, params, use_tqdm=False)
    got = overlapped.generate(prompts, params, use_tqdm=False)
    engine = overlapped.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.num_free_blocks == engine.runner.num_blocks
    assert all(r.num_pending_tokens == 0 for r in engine.scheduler.requests.values())
    return expected, got, overlapped


def test_the_engine_really_overlaps_steps():
    llm = tiny(True)
    engine = llm.engine
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert engine.step() == []  # the prompt step is launched; its token is not read yet
    request = engine.scheduler.requests["a"]
    assert request.num_pending_tokens == 1 and request.output_token_ids == []
    assert engine.step() == []  # the first token is read while the second step runs
    assert len(request.output_token_ids) == 1 and request.num_pending_tokens == 1


def test_greedy_outputs_and_lengths_match_the_synchronous_engine():
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (1, 5, 12, 3)]
    expected, got, _ = generate_both(params)
    assert token_ids(got) == token_ids(expected)
    assert [len(o.outputs[0].token_ids) for o in got] == [1, 5, 12, 3]


def test_a_stop_token_ends_the_request_at_the_same_place():
    free = tiny(False).generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    stop_id = free[0].outputs[0].token_ids[4]  # greedy from a random model: stop where it first appears
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id])
    expected, got, _ = generate_both(params)
    assert token_ids(got) == token_ids(expected)
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in expected]
    assert got[2].outputs[0].finish_reason == "stop" and got[2].outputs[0].token_ids[-1] == stop_id


def test_seeded_sampling_penalties_logprobs_and_min_tokens_match():
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=3, n=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=1.0, max_tokens=6, seed=11, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=8, min_tokens=6, stop_token_ids=[1, 2, 3]),
    ]
    expected, got, _ = generate_both(params)
    assert token_ids(got) == token_ids(expected)
    assert got[2].outputs[0].logprobs == expected[2].outputs[0].logprobs


def test_preempted_requests_resume_with_their_pending_token():
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [list(range(3 + i, 20 + i)) for i in range(6)]
    expected = tiny(False).generate(prompts, params, use_tqdm=False)  # roomy: no preemption
    llm = tiny(True, num_blocks=14, block_size=8, max_model_len=100)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert token_ids(got) == token_ids(expected)
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.runner.num_blocks


def test_an_abort_while_a_token_is_pending_drops_it_and_frees_the_blocks():
    llm = tiny(True)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine.add_request("kept", PROMPTS[0], params)
    engine.add_request("aborted", PROMPTS[1], params)
    for _ in range(3):
        engine.step()
    engine.abort_request("aborted")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs] == ["kept"]
    expected = tiny(False).generate(PROMPTS[0], params, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert engine.kv_cache.num_free_blocks == engine.runner.num_blocks


def test_a_reused_request_id_does_not_receive_the_finished_ones_extra_token():
    llm = tiny(True)
    engine = llm.engine
    free = tiny(False).generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    stop_id = free[0].outputs[0].token_ids[2]
    stopping = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id])
    engine.add_request("x", PROMPTS[2], stopping)
    outputs = []
    while not outputs:
        outputs = engine.step()  # "x" stops while its next step is already launched
    assert outputs[0].outputs[0].token_ids[-1] == stop_id
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    engine.add_request("x", PROMPTS[0], params)  # same id, before the launched step is read
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    expected = tiny(False).generate(PROMPTS[0], params, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == expected[0].outputs[0].token_ids


def test_a_prompt_chunk_has_no_pending_tokens():
    llm = tiny(True, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("a", list(range(3, 40)), SamplingParams(temperature=0.0, max_tokens=2))
    chunk = engine.scheduler.schedule().sequences[0]
    assert len(chunk.token_ids) == 16 and chunk.num_pending_tokens == 0 and not chunk.sample


def test_pending_tokens_are_scheduled_as_placeholders_and_last_ones_wait():
    llm = tiny(True)
    engine = llm.engine
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    first = engine.scheduler.schedule()
    engine.scheduler.advance(first)  # as if launched: one token pending
    second = engine.scheduler.schedule()
    assert second.sequences[0].token_ids == [PENDING_TOKEN_ID]
    assert second.sequences[0].num_pending_tokens == 1
    engine.scheduler.advance(second)  # two pending = max_tokens: nothing more to schedule
    assert engine.scheduler.schedule().sequences == []


@pytest.fixture(scope="module")
def smollm2_async(smollm2):
    return LLM.from_checkpoint(
        smollm2, kv_cache_memory_gib=0.25, max_model_len=512, enable_prefix_caching=False
    ).engine, LLM.from_checkpoint(
        smollm2,
        kv_cache_memory_gib=0.25,
        max_model_len=512,
        enable_prefix_caching=False,
        async_scheduling=True,
    ).engine


def test_streamed_stop_strings_match_on_smollm2(smollm2_async):
    sync, overlapped = smollm2_async
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=[" the"], ignore_eos=True)
    texts = []
    for engine in (sync, overlapped):
        engine.add_request("s", "The history of the city of Paris began", params, stream=True)
        deltas = []
        while engine.has_unfinished_requests():
            deltas += [o.outputs[0].text for o in engine.step()]
        texts.append("".join(deltas))
        assert engine.kv_cache.num_free_blocks == engine.runner.num_blocks
    assert texts[0] == texts[1] and " the" not in texts[1]
