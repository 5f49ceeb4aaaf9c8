"""The engine's control hooks on the tiny preset: knobs apply between steps, ceilings hold, the
batch wait holds new prompts, and the step stats carry what the cost model needs."""

import pytest

from adaptserve import LLM, SamplingParams
from adaptserve.adapt.knobs import Decision
from adaptserve.adapt.step_cost import StepShape
from adaptserve.config import SchedulerConfig
from adaptserve.engine.kv_cache import KVCacheManager
from adaptserve.engine.request import Request
from adaptserve.engine.scheduler import Scheduler


class OneAtATime:
    name = "one_at_a_time"

    def decide(self, snapshot):
        return Decision({"max_num_seqs": 1}, "test: serialize")


class Recorder:
    def __init__(self):
        self.stats = []

    def record(self, stats):
        self.stats.append(stats)


def _llm():
    return LLM("tiny", max_model_len=128, num_blocks=64, max_num_seqs=8)


def test_a_decision_applies_between_steps_and_is_logged():
    llm = _llm()
    recorder = Recorder()
    llm.engine.stat_loggers.append(recorder)
    control = llm.engine.enable_control([OneAtATime()], interval_s=0.0)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False)
    # the first step admitted both (the knob changes after a step); running requests are not evicted
    assert max(s.num_running for s in recorder.stats) == 2
    assert llm.engine.scheduler.config.max_num_seqs == 1 and llm.engine.knobs.max_num_seqs == 1
    recorder.stats.clear()
    outputs = llm.generate([[5, 6, 7], [8, 9], [10, 11, 12]], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [6, 6, 6]
    assert max(s.num_running for s in recorder.stats) == 1  # new requests start one at a time
    assert control.switches.counts == {("max_num_seqs", "one_at_a_time"): 1}


def test_step_stats_carry_the_shape_and_the_execute_time():
    llm = _llm()
    recorder = Recorder()
    llm.engine.stat_loggers.append(recorder)
    llm.generate(
        [[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False
    )
    first, second = recorder.stats[0], recorder.stats[1]
    assert (first.num_sequences, first.num_context_tokens) == (1, 4)  # the 4-token prompt
    assert (second.num_sequences, second.num_context_tokens) == (1, 5)  # one decode over 5 tokens
    assert first.arrivals and first.arrivals[0][1] == 4 and not second.arrivals
    assert all(0 < s.execute_time <= s.step_time + 1e-6 for s in recorder.stats)
    StepShape(
        second.num_scheduled_tokens, second.num_sequences, second.num_context_tokens, second.execute_time
    )


def test_knob_ceilings_and_unbuilt_knobs_are_refused():
    engine = _llm().engine
    with pytest.raises(ValueError, match="max_num_seqs=9 exceeds the configured ceiling 8"):
        engine.apply_knob("max_num_seqs", 9)
    with pytest.raises(ValueError, match="kv_format cannot change at run time"):
        engine.apply_knob("kv_format", "int8")
    engine.apply_knob("prefill_chunk", 32)
    assert engine.scheduler.config.long_prefill_token_threshold == 32


def _request(rid, num_tokens, arrival):
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    return Request(rid, list(range(1, num_tokens + 1)), params, frozenset(), arrival, 0, 10_000)


def test_batch_wait_holds_new_prompts_while_requests_run():
    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=256, batch_wait_s=0.5), KVCacheManager(64, 16)
    )
    scheduler.add_request(_request("a", 10, arrival=0.0))
    out = scheduler.schedule(now=0.0)  # nothing runs: no reason to wait
    assert [s.request_id for s in out.sequences] == ["a"]
    scheduler.advance(out)
    scheduler.add_request(_request("b", 10, arrival=1.0))
    assert [s.request_id for s in scheduler.schedule(now=1.2).sequences] == ["a"]  # b waits
    assert [s.request_id for s in scheduler.schedule(now=1.5).sequences] == ["a", "b"]  # waited 0.5 s


def test_batch_wait_lets_prompts_that_fill_the_budget_start_at_once():
    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=64, batch_wait_s=0.5), KVCacheManager(64, 16)
    )
    scheduler.add_request(_request("a", 10, arrival=0.0))
    scheduler.advance(scheduler.schedule(now=0.0))
    scheduler.add_request(_request("b", 100, arrival=1.0))
    assert [s.request_id for s in scheduler.schedule(now=1.0).sequences] == ["a", "b"]
