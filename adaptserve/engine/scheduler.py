"""Token-budget scheduler: continuous batching with chunked prefill, priorities and preemption.

There are no prefill and decode phases. Every request has `num_computed_tokens` that catches up to
`num_tokens`; each step hands out at most `max_num_batched_tokens` tokens, running requests first
(decodes and unfinished prompt chunks alike), then waiting ones. When the KV cache runs out, the least
important running request is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable

from adaptserve.config import SchedulerConfig
from adaptserve.engine.kv_cache import KVCacheManager
from adaptserve.engine.outputs import PENDING_TOKEN_ID, RunnerOutput, ScheduledSequence, SchedulerOutput
from adaptserve.engine.request import Request, RequestStatus


class WaitingQueue:
    """FCFS: a deque (preempted requests go back to the front). Priority: a heap on
    (priority, arrival_time, insertion order), so a preempted request regains its old place."""

    def __init__(self, policy: str):
        self.by_priority = policy == "priority"
        self._deque: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def add(self, request: Request, front: bool = False) -> None:
        if self.by_priority:
            heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._counter), request))
        elif front:
            self._deque.appendleft(request)
        else:
            self._deque.append(request)

    def peek(self) -> Request:
        return self._heap[0][3] if self.by_priority else self._deque[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3] if self.by_priority else self._deque.popleft()

    def remove(self, request: Request) -> None:
        if self.by_priority:
            self._heap = [item for item in self._heap if item[3] is not request]
            heapq.heapify(self._heap)
        else:
            self._deque.remove(request)

    def __len__(self) -> int:
        return len(self._heap) if self.by_priority else len(self._deque)

    def __iter__(self) -> Iterable[Request]:
        return iter([item[3] for item in self._heap] if self.by_priority else self._deque)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv_cache = kv_cache
        self.waiting = WaitingQueue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []  # finished since the last schedule(), for the executor
        self.num_preemptions = 0

    # ---- requests in and out -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Abort or end a request wherever it is; its blocks go back to the pool. Unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.kv_cache.free(request)
        self._finished_ids.append(request_id)
        return request

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def queue_ahead(self, priority: int) -> tuple[int, int]:
        """(requests, prompt tokens) waiting that a new request of `priority` would queue behind: all
        of them under FCFS; under the priority policy, those of the same or a more important priority."""
        ahead = [r for r in self.waiting if not self.waiting.by_priority or r.priority <= priority]
        return len(ahead), sum(r.num_tokens - r.num_computed_tokens for r in ahead)

    def num_running_prefill_tokens(self) -> int:
        """Prompt tokens that running requests still have to compute (chunked prefills)."""
        return sum(max(0, r.num_tokens - r.num_computed_tokens - 1) for r in self.running)

    # ---- one step ------------------------------------------------------------------------------------

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """`now` (engine clock) is needed only for `batch_wait_s`; without it new prompts never wait."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[str] = []
        if self.waiting.by_priority:
            self.running.sort(key=lambda r: (r.priority, r.arrival_time))
            self._preempt_for_priority(preempted)
        num_priority_preemptions = len(preempted)

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._num_new_tokens(request, request.num_computed_tokens, budget)
            if num_new <= 0 or self._ends_with_pending(request):
                index += 1  # its pending token is its last: it finishes when that token arrives
                continue
            if self._allocate_or_preempt(request, num_new, preempted):
                scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                index += 1

        out_of_blocks = len(preempted) > num_priority_preemptions  # then admit nobody new this step
        if self._holding_new_prompts(now, budget):
            out_of_blocks = True
        started_priority = None  # priority policy: new prompts of one priority per step (see below)
        while (
            not out_of_blocks and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting.peek()
            # packing less important prompts into the step that starts more important ones would
            # delay the latter's first token by the former's prefill: they start next step instead
            if started_priority is not None and request.priority > started_priority:
                break
            hit_blocks, num_hit = self.kv_cache.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, num_hit, budget)
            if self.kv_cache.allocate_slots(request, num_new, hit_blocks) is None:
                break
            self.waiting.pop()
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            if self.waiting.by_priority:
                started_priority = request.priority

        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(scheduled, self.config.max_num_batched_tokens - budget, finished, preempted)

    def _holding_new_prompts(self, now: float | None, budget: int) -> bool:
        """Batch wait: while requests run, new prompts start together once the oldest has waited
        `batch_wait_s` or they fill the step's remaining budget, so decodes are interrupted less often."""
        wait = self.config.batch_wait_s
        if not wait or now is None or not self.running or not self.waiting:
            return False
        oldest = min(r.arrival_time for r in self.waiting)
        if now - oldest >= wait:
            return False
        waiting_tokens = sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
        return waiting_tokens < budget

    def _preempt_for_priority(self, preempted: list[str]) -> None:
        """Priority policy: while the most important waiting request outranks the least important
        running one and has no slot (or no blocks) to start in, the running one yields its place
        (preempted by recompute, it waits at its own rank). Strict ranking means no ping-pong."""
        while self.waiting and self.running:
            head, victim = self.waiting.peek(), self.running[-1]
            if (head.priority, head.arrival_time) >= (victim.priority, victim.arrival_time):
                return
            first_chunk = min(head.num_tokens, self.config.max_num_batched_tokens)
            blocks_needed = -(-first_chunk // self.kv_cache.block_size)
            has_slot = len(self.running) < self.config.max_num_seqs
            if has_slot and blocks_needed <= self.kv_cache.num_free_blocks:
                return
            self._preempt(victim)
            preempted.append(victim.request_id)

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        """Its known tokens not yet computed, then its drafts (verified in the same pass), within limits."""
        num_wanted = request.num_tokens + request.num_pending_tokens + len(request.spec_token_ids)
        num_new = min(num_wanted - num_computed, budget)
        if self.config.long_prefill_token_threshold:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Find room for `request`, preempting the least important unscheduled running request (the
        last one) until it fits. False when `request` itself had to go."""
        while self.kv_cache.allocate_slots(request, num_new) is None:
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(request, front=True)

    @staticmethod
    def _ends_with_pending(request: Request) -> bool:
        """The token still on the device is the request's last (max_tokens or the context window)."""
        num_outputs = request.num_output_tokens + request.num_pending_tokens
        return request.num_pending_tokens > 0 and num_outputs >= request.max_output_tokens

    def _scheduled(self, request: Request, num_new: int) -> ScheduledSequence:
        start = request.num_computed_tokens
        num_known = request.num_tokens + request.num_pending_tokens
        num_drafts = max(0, start + num_new - num_known)  # drafts come after every known token
        tokens = request.all_token_ids[start : start + num_new - num_drafts]
        num_pending = max(0, start + num_new - num_drafts - request.num_tokens)  # known on the device only
        tokens += [PENDING_TOKEN_ID] * num_pending
        tokens += request.spec_token_ids[:num_drafts]
        request.spec_token_ids = []  # drafts are proposed afresh for every step
        return ScheduledSequence(
            request_id=request.request_id,
            token_ids=tokens,
            num_computed_tokens=start,
            block_ids=self.kv_cache.get_block_ids(request.request_id),
            sample=start + num_new - num_drafts == num_known,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            num_pending_tokens=num_pending,
            num_draft_tokens=num_drafts,
        )

    # ---- results -------------------------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput
    ) -> list[Request]:
        """Advance computed counters, append sampled tokens, finish requests that hit a stop condition.
        Returns the requests that received a token this step (finished ones included)."""
        return self.resolve(self.advance(scheduler_output), runner_output)

    def advance(self, scheduler_output: SchedulerOutput) -> dict[str, Request]:
        """Right after a step is launched: its tokens count as computed, and each sequence it samples
        has a pending token, so the next step can be scheduled before this one's tokens are known.
        Returns the step's sampled requests by id, for `resolve`."""
        sampled: dict[str, Request] = {}
        for seq in scheduler_output.sequences:
            request = self.requests.get(seq.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted or finished since it was scheduled
            request.num_computed_tokens += len(seq.token_ids)
            request.num_drafts_in_flight = seq.num_draft_tokens
            if seq.sample:
                request.num_pending_tokens += 1
                sampled[seq.request_id] = request
        return sampled

    def resolve(self, sampled: dict[str, Request], runner_output: RunnerOutput) -> list[Request]:
        """The step's tokens have reached the host: append them and finish requests that stop.
        Requests are matched by identity, so a finished request's id reused by a new one is safe."""
        updated = []
        for index, (request_id, logprobs) in enumerate(
            zip(runner_output.request_ids, runner_output.logprobs, strict=True)
        ):
            request = sampled.get(request_id)
            if request is None or self.requests.get(request_id) is not request:
                continue  # aborted or finished while the step ran: its token is dropped
            request.num_pending_tokens -= 1
            new_token_ids = runner_output.new_token_ids(index)
            self._roll_back_rejected_drafts(request, num_accepted=len(new_token_ids) - 1)
            if logprobs is not None:
                request.output_logprobs.append(logprobs)
            updated.append(request)
            for token_id in new_token_ids:
                request.output_token_ids.append(token_id)
                status = self._check_stop(request, token_id)
                if status is not None:  # later accepted tokens are dropped
                    self.finish_request(request_id, status)
                    break
        return updated

    def _roll_back_rejected_drafts(self, request: Request, num_accepted: int) -> None:
        """Rejected drafts' KV is stale: they no longer count as computed, and blocks that held only
        them go back to the pool (their slots are rewritten when real tokens reach those positions)."""
        num_drafts, request.num_drafts_in_flight = request.num_drafts_in_flight, 0
        if num_drafts > num_accepted:
            request.num_computed_tokens -= num_drafts - num_accepted
            self.kv_cache.trim(request)

    @staticmethod
    def _check_stop(request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
