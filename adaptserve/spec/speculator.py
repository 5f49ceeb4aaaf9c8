"""The engine's side of speculative decoding: before a step, give running requests their drafts;
after it, feed acceptance and step cost back to the policy that decides how far to draft.

Drafts need a request's latest tokens, so a step that verifies drafts is scheduled only after the
previous step's tokens are read (the engine drains async scheduling first), and its own tokens are
read as soon as it is launched. A step the policy runs without drafts keeps async scheduling.
"""

from __future__ import annotations

from adaptserve.adapt.speculation import SpeculationPolicy
from adaptserve.config import SpeculativeConfig
from adaptserve.engine.outputs import DEVICE_DRAFT_TOKEN_ID, RunnerOutput, SchedulerOutput
from adaptserve.engine.request import Request, RequestStatus
from adaptserve.spec.ngram import NgramProposer


class Speculator:
    """propose() before schedule(), observe() after the step's tokens are read."""

    def __init__(self, config: SpeculativeConfig, policy: SpeculationPolicy | None = None):
        if config.spec_method == "layers":
            self.proposer = DeviceDraftProposer()
        else:
            self.proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.policy = policy or SpeculationPolicy(config.num_speculative_tokens, config.spec_adaptive)
        self.drafter = self.proposer.name

    def draft_budget(self, now: float, running: list[Request]) -> int:
        """The most drafts per request in the coming step (0: a plain step, no need to drain)."""
        return self.policy.draft_budget(now, len(running))

    def propose(self, running: list[Request], budget: int) -> int:
        """Set `spec_token_ids` of the running requests that may speculate; returns drafts proposed."""
        candidates = [r for r in running if can_speculate(r)]
        num_found = num_drafts = 0
        for request in candidates:
            room = request.max_output_tokens - request.num_output_tokens - 1  # the bonus token needs one
            k = min(self.policy.request_draft_len(request.request_id, budget, len(running)), room)
            drafts = self.proposer.propose(request.request_id, request.all_token_ids, k)
            request.spec_token_ids = drafts
            num_found += bool(drafts)
            num_drafts += len(drafts)
        self.policy.observe_proposals(len(candidates), num_found)
        return num_drafts

    def observe(
        self, scheduled: SchedulerOutput, output: RunnerOutput, execute_seconds: float
    ) -> tuple[int, int]:
        """Acceptance per request and the step's cost; returns (drafted, accepted) tokens."""
        self.policy.observe_step(scheduled.num_batched_tokens, scheduled.num_draft_tokens, execute_seconds)
        if not scheduled.num_draft_tokens:
            return 0, 0
        accepted_by_id = {
            request_id: len(output.accepted_token_ids[i]) if output.accepted_token_ids else 0
            for i, request_id in enumerate(output.request_ids)
        }
        num_drafted = num_accepted = 0
        for seq in scheduled.sequences:
            if seq.num_draft_tokens and seq.request_id in accepted_by_id:
                accepted = accepted_by_id[seq.request_id]
                self.policy.observe_request(seq.request_id, seq.num_draft_tokens, accepted)
                num_drafted += seq.num_draft_tokens
                num_accepted += accepted
        return num_drafted, num_accepted

    def forget(self, request_id: str) -> None:
        self.proposer.forget(request_id)
        self.policy.forget(request_id)


class DeviceDraftProposer:
    """Drafts made by the runner on the device (spec/layer_drafter.py): the scheduler only needs
    their count, so each is a placeholder that reserves its slot in the step."""

    name = "layers"

    def propose(self, request_id: str, token_ids: list[int], max_drafts: int) -> list[int]:
        return [DEVICE_DRAFT_TOKEN_ID] * max(0, max_drafts)

    def forget(self, request_id: str) -> None:
        pass


def can_speculate(request: Request) -> bool:
    """Decoding, with every token known on the host, and sampled with no per-position state: penalties,
    logprobs and min_tokens' blocked ids change with each earlier token, which drafts would shift."""
    params = request.sampling_params
    return (
        request.status == RequestStatus.RUNNING
        and request.num_pending_tokens == 0
        and request.num_computed_tokens == request.num_tokens - 1
        and not params.has_penalties
        and params.logprobs is None
        and request.num_output_tokens >= params.min_tokens
    )
