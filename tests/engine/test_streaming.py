"""LLMEngine streaming on the real SmolLM2: delta outputs add up to the non-streamed output, stop
strings are never leaked, n > 1 siblings each finish once, and the StepStats handed to stat loggers
agree with what was generated (aborts included).

Prefix caching is off so that running the same prompt twice computes exactly the same thing, which
makes greedy outputs of separate runs comparable token for token."""

import dataclasses
from collections import defaultdict

import pytest

from adaptserve import LLM, SamplingParams
from adaptserve.engine.request import RequestOutput
from adaptserve.engine.stats import StepStats

PROMPT = "The history of the city of Paris began"
OTHER_PROMPT = "Here is a short list of fruits and their colours: apple is red, banana is"
THIRD_PROMPT = "Once upon a time"
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def module_engine(smollm2):
    return LLM.from_checkpoint(
        smollm2, kv_cache_memory_gib=0.25, max_model_len=1024, enable_prefix_caching=False
    ).engine


@pytest.fixture(scope="module")
def free_text(module_engine):
    """The greedy non-streamed text of PROMPT, with no stop strings."""
    return final(module_engine, PROMPT, GREEDY).outputs[0].text


@pytest.fixture
def engine(module_engine):
    """The shared engine; each test must leave it empty, with every KV block free and no loggers."""
    yield module_engine
    module_engine.stat_loggers.clear()
    assert not module_engine.has_unfinished_requests()
    assert module_engine.kv_cache.num_free_blocks == module_engine.runner.num_blocks


class Collector:
    def __init__(self):
        self.steps: list[StepStats] = []

    def record(self, stats: StepStats) -> None:
        self.steps.append(stats)


def run(engine, requests: dict[str, tuple[str, SamplingParams]], stream: bool) -> list[RequestOutput]:
    """Add the requests, step until all finish; every output that step() returned, in order."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params, stream=stream)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    return outputs


def final(engine, prompt: str, params: SamplingParams) -> RequestOutput:
    """The one output of a non-streamed request."""
    (output,) = run(engine, {"final": (prompt, params)}, stream=False)
    assert output.finished
    return output


def joined(deltas: list[RequestOutput], index: int = 0) -> tuple[str, list[int]]:
    """Text and token ids of completion `index`, concatenated over the stream."""
    parts = [c for d in deltas for c in d.outputs if c.index == index]
    return "".join(c.text for c in parts), [t for c in parts for t in c.token_ids]


def test_greedy_stream_adds_up_to_the_non_streamed_output(engine):
    expected = final(engine, PROMPT, GREEDY).outputs[0]
    deltas = run(engine, {"s": (PROMPT, GREEDY)}, stream=True)

    assert len(deltas) > 1, "a 24-token stream should arrive in several pieces"
    assert all(d.request_id == "s" for d in deltas)
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    text, token_ids = joined(deltas)
    assert token_ids == expected.token_ids
    assert text == expected.text
    assert [c.finish_reason for d in deltas for c in d.outputs] == [None] * (len(deltas) - 1) + ["length"]


def test_stream_never_sends_the_stop_string(engine, free_text):
    # a stop string that really occurs, well inside the output and several characters long, so
    # that it arrives over more than one step
    start = len(free_text) // 2
    stop = free_text[start : start + 6]
    assert len(stop.strip()) >= 3, repr(stop)
    cut = free_text.find(stop)
    assert cut > 0

    params = dataclasses.replace(GREEDY, stop=[stop])
    expected = final(engine, PROMPT, params).outputs[0]
    assert expected.text == free_text[:cut]
    assert expected.finish_reason == "stop" and expected.stop_reason == stop

    deltas = run(engine, {"s": (PROMPT, params)}, stream=True)
    sent = ""
    for delta in deltas:
        sent += delta.outputs[0].text
        assert stop not in sent, f"stop string {stop!r} leaked in {sent!r}"
    assert sent == expected.text
    last = deltas[-1].outputs[0]
    assert (last.finish_reason, last.stop_reason) == ("stop", stop)


def test_stream_with_n_2_gives_both_indexes_and_one_finish_each(engine):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    expected = final(engine, OTHER_PROMPT, params)
    deltas = run(engine, {"s": (OTHER_PROMPT, params)}, stream=True)

    finishes = defaultdict(int)
    done = set()
    for delta in deltas:
        for c in delta.outputs:
            assert c.index not in done, f"index {c.index} sent something after it finished"
            if c.finish_reason is not None:
                finishes[c.index] += 1
                done.add(c.index)
    assert dict(finishes) == {0: 1, 1: 1}
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    for index in (0, 1):
        text, token_ids = joined(deltas, index)
        assert token_ids == expected.outputs[index].token_ids
        assert text == expected.outputs[index].text
    assert joined(deltas, 0)[1] != joined(deltas, 1)[1]  # seeds 7 and 8


def test_step_stats_agree_with_what_was_generated(engine, free_text):
    collector = Collector()
    engine.stat_loggers.append(collector)
    stop = free_text[10:16]
    assert len(stop.strip()) >= 3, repr(stop)
    requests = {
        "length": (THIRD_PROMPT, SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)),
        "stop": (PROMPT, dataclasses.replace(GREEDY, stop=[stop])),
        "pair": (OTHER_PROMPT, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True)),
    }
    prompt_lengths = {rid: len(engine.encode_prompt(prompt)) for rid, (prompt, _) in requests.items()}
    assert len(set(prompt_lengths.values())) == 3, "prompt lengths identify the finished stats"
    deltas = run(engine, requests, stream=True)

    generated = {rid: 0 for rid in requests}
    for delta in deltas:
        generated[delta.request_id] += sum(len(c.token_ids) for c in delta.outputs)
    assert generated["length"] == 9 and generated["pair"] == 10
    assert sum(s.num_generation_tokens for s in collector.steps) == sum(generated.values())
    assert sum(len(s.time_to_first_token) for s in collector.steps) == 4  # 1 + 1 + 2 sequences
    assert sum(len(s.inter_token_latency) for s in collector.steps) == sum(generated.values()) - 4
    assert all(s.step_time >= 0 and s.num_scheduled_tokens > 0 for s in collector.steps)
    assert sum(s.num_prefill_tokens for s in collector.steps) >= sum(prompt_lengths.values())

    finished = [f for s in collector.steps for f in s.finished]
    assert len(finished) == 3
    by_prompt = {f.num_prompt_tokens: f for f in finished}
    expected_reasons = {"length": "length", "stop": "stop", "pair": "length"}
    for rid, reason in expected_reasons.items():
        stats = by_prompt[prompt_lengths[rid]]
        assert stats.finish_reason == reason, rid
        assert stats.num_generation_tokens == generated[rid], rid
        assert stats.e2e_latency >= stats.queue_time >= 0


def test_abort_of_a_running_stream_records_abort_and_frees_every_block(engine):
    collector = Collector()
    engine.stat_loggers.append(collector)
    engine.add_request("a", PROMPT, dataclasses.replace(GREEDY, max_tokens=200), stream=True)
    received = 0
    while received < 3:
        received += sum(len(c.token_ids) for d in engine.step() for c in d.outputs)
    assert engine.kv_cache.usage > 0

    engine.abort_request("a")
    finished = [f for s in collector.steps for f in s.finished]
    assert len(finished) == 1
    assert finished[0].finish_reason == "abort"
    assert finished[0].num_prompt_tokens == len(engine.encode_prompt(PROMPT))
    assert finished[0].num_generation_tokens == received
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.usage == 0
    assert engine.kv_cache.num_free_blocks == engine.runner.num_blocks
