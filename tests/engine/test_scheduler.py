"""Scheduler + KV-cache bookkeeping without a model: a fake executor that 'stores' token ids in cache
slots and checks, before every sample, that each context slot holds the right token (so prefix hits,
chunking and preemption must all point at the right blocks)."""

import random

import pytest

from adaptserve.config import SchedulerConfig
from adaptserve.engine.kv_cache import KVCacheManager
from adaptserve.engine.outputs import RunnerOutput, SchedulerOutput
from adaptserve.engine.request import Request, RequestStatus, SamplingParams
from adaptserve.engine.scheduler import Scheduler

VOCAB = 50
EOS = 0


def next_token(history: list[int]) -> int:
    """Deterministic 'greedy model': the next token depends only on the history."""
    return (sum(history[-4:]) * 31 + 7 * len(history)) % (VOCAB - 1) + 1


class FakeExecutor:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slots: dict[int, tuple[int, int]] = {}  # slot -> (position, token id)
        self.num_tokens_computed = 0

    def execute(self, out: SchedulerOutput, requests: dict[str, Request]) -> RunnerOutput:
        ids, tokens = [], []
        for seq in out.sequences:
            request = requests[seq.request_id]
            start = seq.num_computed_tokens
            assert seq.token_ids == request.all_token_ids[start : start + len(seq.token_ids)]
            end = start + len(seq.token_ids)
            assert len(seq.block_ids) * self.block_size >= end, "blocks do not cover the scheduled tokens"
            for pos in range(start, end):
                self.slots[self._slot(seq.block_ids, pos)] = (pos, request.all_token_ids[pos])
            self.num_tokens_computed += len(seq.token_ids)
        for seq in out.sequences:  # read after all writes, like the real runner
            if not seq.sample:
                continue
            history = requests[seq.request_id].all_token_ids
            end = seq.num_computed_tokens + len(seq.token_ids)
            assert end == len(history)
            for pos in range(end):
                assert self.slots[self._slot(seq.block_ids, pos)] == (pos, history[pos]), "stale or wrong KV"
            ids.append(seq.request_id)
            tokens.append(next_token(history))
        return RunnerOutput(ids, tokens, [None] * len(ids))

    def _slot(self, block_ids, pos):
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size


def make_request(rid, prompt, max_tokens, priority=0, arrival=0.0):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=False)
    return Request(rid, prompt, params, frozenset({EOS}), arrival, priority, max_total_tokens=10_000)


def check_invariants(scheduler: Scheduler, kv: KVCacheManager, num_blocks: int):
    live = [r for r in scheduler.requests.values() if r.status == RequestStatus.RUNNING]
    refs: dict[int, int] = {}
    for r in live:
        for b in kv.get_block_ids(r.request_id):
            refs[b] = refs.get(b, 0) + 1
    for r in scheduler.requests.values():
        if r.status != RequestStatus.RUNNING:
            assert kv.get_block_ids(r.request_id) == [], "a waiting request holds blocks"
    pool_refs = {b.block_id: b.ref_cnt for b in kv.block_pool.blocks if b.ref_cnt}
    assert pool_refs == refs, "ref counts disagree with the block tables"
    assert kv.num_free_blocks == num_blocks - len(refs)


def run_to_completion(scheduler, kv, executor, num_blocks, abort_rate=0.0, rng=None, max_steps=100_000):
    finished = {}
    for _ in range(max_steps):
        if not scheduler.requests:
            return finished
        out = scheduler.schedule()
        result = executor.execute(out, scheduler.requests)
        snapshot = list(scheduler.requests.values())
        scheduler.update_from_output(out, result)
        for r in snapshot:
            if r.is_finished:
                finished[r.request_id] = r
        if abort_rate and scheduler.requests and rng.random() < abort_rate:
            victim = rng.choice(list(scheduler.requests))
            finished[victim] = scheduler.finish_request(victim, RequestStatus.FINISHED_ABORTED)
        check_invariants(scheduler, kv, num_blocks)
    raise AssertionError("did not finish")


def reference_output(prompt, max_tokens):
    history, out = list(prompt), []
    while len(out) < max_tokens:
        tok = next_token(history)
        history.append(tok)
        out.append(tok)
        if tok == EOS:
            break
    return out


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_thousand_random_requests_no_leak(policy):
    rng = random.Random(1234)
    block_size, num_blocks = 4, 96
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
    config = SchedulerConfig(max_num_seqs=12, max_num_batched_tokens=48, policy=policy)
    scheduler = Scheduler(config, kv)
    executor = FakeExecutor(block_size)
    shared = [rng.randrange(1, VOCAB) for _ in range(24)]
    expected = {}
    finished = {}
    for i in range(1000):
        n = rng.randint(1, 40)
        prompt = (shared[: rng.randint(0, 24)] + [rng.randrange(1, VOCAB) for _ in range(n)])[:60] or [1]
        max_tokens = rng.randint(1, 24)
        rid = f"r{i}"
        expected[rid] = reference_output(prompt, max_tokens)
        scheduler.add_request(
            make_request(rid, prompt, max_tokens, priority=rng.randint(0, 3), arrival=float(i))
        )
        if i % 50 == 49:  # let a wave of requests run, with random aborts
            finished.update(run_to_completion(scheduler, kv, executor, num_blocks, abort_rate=0.05, rng=rng))
    finished.update(run_to_completion(scheduler, kv, executor, num_blocks, abort_rate=0.05, rng=rng))

    assert len(finished) == 1000
    assert kv.num_free_blocks == num_blocks, "blocks leaked"
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)
    assert scheduler.num_preemptions > 0, "the test should exercise preemption"
    num_aborted = 0
    for rid, request in finished.items():
        if request.status == RequestStatus.FINISHED_ABORTED:
            num_aborted += 1
            assert request.output_token_ids == expected[rid][: len(request.output_token_ids)]
        else:
            assert request.output_token_ids == expected[rid], f"{rid} (preempted {request.num_preemptions}x)"
    assert 0 < num_aborted < 1000


def test_prefix_hits_are_counted():
    block_size = 4
    kv = KVCacheManager(64, block_size, enable_prefix_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), kv)
    executor = FakeExecutor(block_size)
    prefix = list(range(1, 13))  # 3 full blocks
    scheduler.add_request(make_request("a", prefix + [20, 21], 2))
    run_to_completion(scheduler, kv, executor, 64)
    scheduler.add_request(make_request("b", prefix + [30], 2))
    before = executor.num_tokens_computed
    out = scheduler.schedule()
    assert out.sequences[0].num_computed_tokens == 12
    assert out.sequences[0].token_ids == [30]
    scheduler.update_from_output(out, executor.execute(out, scheduler.requests))
    assert executor.num_tokens_computed - before == 1
    assert scheduler.requests["b"].num_cached_tokens == 12


def test_preempted_request_matches_undisturbed_output():
    block_size, num_blocks = 4, 12  # 48 tokens: two 20-token prompts growing to 40 cannot both fit
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv)
    executor = FakeExecutor(block_size)
    prompts = {"x": list(range(1, 21)), "y": list(range(21, 41))}
    for rid, prompt in prompts.items():
        scheduler.add_request(make_request(rid, prompt, 20))
    for r in scheduler.requests.values():
        r.sampling_params.ignore_eos = True
    finished = run_to_completion(scheduler, kv, executor, num_blocks)
    assert scheduler.num_preemptions > 0
    for rid, prompt in prompts.items():
        history, out = list(prompt), []
        for _ in range(20):
            out.append(next_token(history))
            history.append(out[-1])
        assert finished[rid].output_token_ids == out


def test_chunked_prefill_is_mixed_with_decodes():
    kv = KVCacheManager(64, 4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=10), kv)
    executor = FakeExecutor(4)
    scheduler.add_request(make_request("short", [1, 2, 3], 5))
    out = scheduler.schedule()
    scheduler.update_from_output(out, executor.execute(out, scheduler.requests))
    scheduler.add_request(make_request("long", list(range(1, 31)), 2))
    out = scheduler.schedule()
    lengths = {s.request_id: len(s.token_ids) for s in out.sequences}
    assert lengths == {"short": 1, "long": 9}  # one decode token plus a 9-token chunk fill the budget
    assert not next(s for s in out.sequences if s.request_id == "long").sample


def _step(scheduler, executor):
    out = scheduler.schedule()
    scheduler.update_from_output(out, executor.execute(out, scheduler.requests))
    return out


def test_max_num_seqs_and_priority_order():
    kv = KVCacheManager(64, 4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, policy="priority"), kv)
    for rid, prio in [("low", 5), ("high", 0), ("mid", 2)]:
        scheduler.add_request(make_request(rid, [1, 2, 3], 3, priority=prio))
    executor = FakeExecutor(4)
    out = _step(scheduler, executor)
    assert [s.request_id for s in out.sequences] == ["high"]  # one priority's new prompts per step
    out = _step(scheduler, executor)
    assert [s.request_id for s in out.sequences] == ["high", "mid"]  # then the slots fill in order
    out = _step(scheduler, executor)
    assert [s.request_id for s in out.sequences] == ["high", "mid"]  # max_num_seqs=2: low waits


def test_priority_preempts_a_less_important_request_for_its_slot():
    kv = KVCacheManager(64, 4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, policy="priority"), kv)
    executor = FakeExecutor(4)
    prompts = {"low-a": [5, 6, 7], "low-b": [8, 9, 10], "same": [11, 12], "high": [13, 14, 15]}
    scheduler.add_request(make_request("low-a", prompts["low-a"], 6, priority=3, arrival=0.0))
    scheduler.add_request(make_request("low-b", prompts["low-b"], 6, priority=3, arrival=1.0))
    _step(scheduler, executor)
    scheduler.add_request(make_request("same", prompts["same"], 6, priority=3, arrival=2.0))
    out = _step(scheduler, executor)
    assert not out.preempted_request_ids  # an equal priority waits for a slot
    scheduler.add_request(make_request("high", prompts["high"], 6, priority=0, arrival=3.0))
    out = _step(scheduler, executor)
    assert out.preempted_request_ids == ["low-b"]  # the least important, latest arrival yields
    assert {s.request_id for s in out.sequences} == {"low-a", "high"}
    finished = run_to_completion(scheduler, kv, executor, 64)
    for rid in ("low-b", "same", "high"):  # the victim resumes and its output is undisturbed
        assert finished[rid].output_token_ids == reference_output(prompts[rid], 6)


def test_abort_frees_blocks():
    kv = KVCacheManager(16, 4)
    scheduler = Scheduler(SchedulerConfig(), kv)
    scheduler.add_request(make_request("a", list(range(1, 10)), 5))
    scheduler.schedule()
    assert kv.num_free_blocks < 16
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == 16
    assert scheduler.schedule().finished_request_ids == ["a"]
