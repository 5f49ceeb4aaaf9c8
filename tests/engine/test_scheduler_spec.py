"""Scheduler + KV bookkeeping with speculative drafts, without a model: a fake 'greedy model' verifies
drafts (some right, some wrong) and checks every KV slot it reads. Output must equal plain decoding,
rejected drafts must give their blocks back, and stop conditions inside accepted drafts must hold."""

import random

import pytest

from adaptserve.config import SchedulerConfig
from adaptserve.engine.kv_cache import KVCacheManager
from adaptserve.engine.outputs import RunnerOutput, SchedulerOutput
from adaptserve.engine.request import Request, RequestStatus, SamplingParams
from adaptserve.engine.scheduler import Scheduler

from .test_scheduler import EOS, make_request, next_token


class VerifyingExecutor:
    """Writes each scheduled token into its slot, then for a sequence with k drafts checks the slots
    of its known context and accepts the drafts that match the greedy model."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slots: dict[int, tuple[int, int]] = {}
        self.num_passes = 0

    def execute(self, out: SchedulerOutput, requests: dict[str, Request]) -> RunnerOutput:
        self.num_passes += 1
        for seq in out.sequences:
            end = seq.num_computed_tokens + len(seq.token_ids)
            assert len(seq.block_ids) * self.block_size >= end
            for offset, token in enumerate(seq.token_ids):
                pos = seq.num_computed_tokens + offset
                self.slots[self._slot(seq.block_ids, pos)] = (pos, token)
        ids, sampled, accepted = [], [], []
        for seq in out.sequences:
            if not seq.sample:
                continue
            history = list(requests[seq.request_id].all_token_ids)
            k = seq.num_draft_tokens
            drafts = seq.token_ids[len(seq.token_ids) - k :] if k else []
            assert seq.num_computed_tokens + len(seq.token_ids) - k == len(history)
            for pos in range(len(history)):
                assert self.slots[self._slot(seq.block_ids, pos)] == (pos, history[pos]), "stale KV"
            taken = []
            for draft in drafts:
                if draft != next_token(history + taken):
                    break
                taken.append(draft)
            ids.append(seq.request_id)
            sampled.append(next_token(history + taken))
            accepted.append(taken)
        return RunnerOutput(ids, sampled, [None] * len(ids), accepted)

    def _slot(self, block_ids, pos):
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size


def greedy_reference(prompt: list[int], max_tokens: int) -> list[int]:
    out: list[int] = []
    while len(out) < max_tokens:
        token = next_token(prompt + out)
        out.append(token)
        if token == EOS:
            break
    return out


def draft_for(request: Request, k: int, rng: random.Random, accuracy: float) -> list[int]:
    """k drafts: each the model's own next token with chance `accuracy`, else a wrong one."""
    history, drafts = list(request.all_token_ids), []
    for _ in range(k):
        right = next_token(history + drafts)
        drafts.append(right if rng.random() < accuracy else right % 49 + 1)
    return drafts


def run(prompts, max_tokens, *, k, accuracy, num_blocks=64, block_size=4, budget=64, seed=0):
    rng = random.Random(seed)
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget), kv)
    executor = VerifyingExecutor(block_size)
    requests = {f"r{i}": make_request(f"r{i}", p, max_tokens) for i, p in enumerate(prompts)}
    for request in requests.values():
        scheduler.add_request(request)
    for _ in range(2000):
        if not scheduler.num_unfinished:
            break
        for request in scheduler.running:
            decoding = request.num_computed_tokens == request.num_tokens - 1
            room = request.max_output_tokens - request.num_output_tokens - 1
            if k and decoding and room > 0:
                request.spec_token_ids = draft_for(request, min(k, room), rng, accuracy)
        out = scheduler.schedule()
        scheduler.update_from_output(out, executor.execute(out, requests))
    assert scheduler.num_unfinished == 0
    assert kv.num_free_blocks == num_blocks, "blocks leaked"
    return requests, executor


@pytest.mark.parametrize("accuracy", [0.0, 0.5, 0.9, 1.0])
def test_drafts_never_change_greedy_output(accuracy):
    prompts = [[1 + i, 2, 3, 4, 5 + i] for i in range(5)]
    plain, plain_exec = run(prompts, 30, k=0, accuracy=accuracy)
    spec, spec_exec = run(prompts, 30, k=4, accuracy=accuracy, seed=1)
    for rid, request in spec.items():
        assert request.output_token_ids == plain[rid].output_token_ids
        assert request.output_token_ids == greedy_reference(request.prompt_token_ids, 30)
    if accuracy == 1.0:  # every draft right: ~5 tokens per pass instead of 1
        assert spec_exec.num_passes * 3 < plain_exec.num_passes


def test_rejected_drafts_roll_back_and_free_their_blocks():
    kv = KVCacheManager(16, 4, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv)
    request = make_request("a", [1, 2, 3], max_tokens=50)
    scheduler.add_request(request)
    executor = VerifyingExecutor(4)
    out = scheduler.schedule()
    scheduler.update_from_output(out, executor.execute(out, {"a": request}))
    assert request.num_computed_tokens == 3 and request.num_tokens == 4
    blocks_before = len(kv.get_block_ids("a"))
    request.spec_token_ids = [99 % 49 + 1] * 8  # all wrong: 8 drafts need 2-3 more blocks
    out = scheduler.schedule()
    assert out.sequences[0].num_draft_tokens == 8 and len(out.sequences[0].token_ids) == 9
    assert len(kv.get_block_ids("a")) == 3  # positions 3..11
    scheduler.update_from_output(out, executor.execute(out, {"a": request}))
    assert request.num_computed_tokens == 4 and request.num_tokens == 5  # only the corrected token
    assert len(kv.get_block_ids("a")) == blocks_before == 1
    assert kv.num_free_blocks == 15


def test_a_stop_token_inside_accepted_drafts_ends_the_request_there():
    kv = KVCacheManager(16, 4)
    scheduler = Scheduler(SchedulerConfig(), kv)
    params = SamplingParams(temperature=0.0, max_tokens=50, stop_token_ids=[7])
    request = Request("a", [1, 2, 3], params, frozenset({EOS}), max_total_tokens=1000)
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update_from_output(out, RunnerOutput(["a"], [5], [None]))
    request.spec_token_ids = [6, 7, 8]
    out = scheduler.schedule()
    # the runner accepted 6, 7 and 8 and sampled 9: the request stops at 7
    scheduler.update_from_output(out, RunnerOutput(["a"], [9], [None], [[6, 7, 8]]))
    assert request.output_token_ids == [5, 6, 7]
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason == 7
    assert kv.num_free_blocks == 16


def test_drafts_respect_the_token_budget():
    kv = KVCacheManager(32, 4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=3), kv)
    request = make_request("a", [1, 2, 3], max_tokens=20)
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update_from_output(out, RunnerOutput(["a"], [5], [None]))
    request.spec_token_ids = [1, 2, 3, 4]
    out = scheduler.schedule()
    (seq,) = out.sequences
    assert seq.token_ids == [5, 1, 2] and seq.num_draft_tokens == 2 and seq.sample
    assert request.spec_token_ids == []  # drafts are proposed afresh each step


def test_preemption_drops_drafts_and_output_stays_exact():
    prompts = [[1 + i, 2, 3, 4, 5, 6, 7] for i in range(6)]
    spec, _ = run(prompts, 25, k=4, accuracy=0.7, num_blocks=14, budget=32, seed=3)
    for request in spec.values():
        assert request.output_token_ids == greedy_reference(request.prompt_token_ids, 25)
    assert sum(r.num_preemptions for r in spec.values()) > 0  # the test exercised preemption
