"""The engine's side of speculative decoding: before a step, pick the drafter and k and give running
requests their drafts; after it, feed acceptance and step cost back to the policy.

Drafts need a request's latest tokens, so a step that verifies drafts is scheduled only after the
previous step's tokens are read (the engine drains async scheduling first), and its own tokens are
read as soon as it is launched. A step the policy runs without drafts keeps async scheduling.
"""

from __future__ import annotations

from adaptserve.adapt.speculation import OFF, SpeculationPolicy
from adaptserve.config import SpeculativeConfig
from adaptserve.engine.outputs import DEVICE_DRAFT_TOKEN_ID, RunnerOutput, SchedulerOutput
from adaptserve.engine.request import Request, RequestStatus
from adaptserve.spec.draft_model import DRAFTER_NAME
from adaptserve.spec.ngram import NgramProposer


class DeviceDraftProposer:
    """Drafts made by the runner: with the target's first `num_layers` layers (spec/layer_drafter.py)
    or, with num_layers 0, with the draft model (spec/draft_model.py). The scheduler only needs
    their count, so each is a placeholder that reserves its slot."""

    def __init__(self, name: str, num_layers: int = 0):
        self.name = name
        self.num_layers = num_layers

    def propose(self, request_id: str, token_ids: list[int], max_drafts: int) -> list[int]:
        return [DEVICE_DRAFT_TOKEN_ID] * max(0, max_drafts)

    def forget(self, request_id: str) -> None:
        pass


def layer_draft_depths(config: SpeculativeConfig, num_model_layers: int) -> tuple[int, ...]:
    depths = config.draft_layers or (num_model_layers // 2, 3 * num_model_layers // 4)
    bad = [d for d in depths if not 1 <= d < num_model_layers]
    if bad:
        raise ValueError(f"speculative.draft_layers={bad} out of range; allowed: 1 to {num_model_layers - 1}")
    return tuple(dict.fromkeys(depths))


class Speculator:
    """choose() and propose() before schedule(), label() after it, observe() once tokens are read."""

    def __init__(
        self,
        config: SpeculativeConfig,
        num_model_layers: int,
        policy: SpeculationPolicy | None = None,
        max_rows: int | None = None,
    ):
        """`max_rows`: the most rows a verify step replays from CUDA graphs (None: no graphs); the
        adaptive policy runs no arm past it."""
        self.proposers: dict[str, NgramProposer | DeviceDraftProposer] = {}
        if config.spec_method in ("ngram", "auto"):
            ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
            self.proposers[ngram.name] = ngram
        if config.spec_method in ("layers", "auto"):
            for depth in layer_draft_depths(config, num_model_layers):
                proposer = DeviceDraftProposer(f"layers{depth}", depth)
                self.proposers[proposer.name] = proposer
        if config.uses_draft_model:
            self.proposers[DRAFTER_NAME] = DeviceDraftProposer(DRAFTER_NAME)
        drafters = tuple(self.proposers)
        self.policy = policy or SpeculationPolicy(
            drafters, config.num_speculative_tokens, config.spec_adaptive, max_rows=max_rows
        )
        self.arm = OFF

    def choose(self, now: float, running: list[Request]) -> int:
        """Pick the coming step's (drafter, k); returns k (0: a plain step, no need to drain)."""
        self.arm = self.policy.choose(now, len(running))
        return self.arm[1]

    def propose(self, running: list[Request]) -> int:
        """Set `spec_token_ids` of the running requests that may speculate; returns drafts proposed."""
        drafter, k = self.arm
        proposer = self.proposers[drafter]
        candidates = [r for r in running if can_speculate(r)]
        num_found = num_drafts = 0
        for request in candidates:
            room = request.max_output_tokens - request.num_output_tokens - 1  # the bonus token needs one
            wanted = min(self.policy.request_draft_len(drafter, request.request_id, k), room)
            drafts = proposer.propose(request.request_id, request.all_token_ids, wanted)
            request.spec_token_ids = drafts
            num_found += bool(drafts)
            num_drafts += len(drafts)
        self.policy.observe_proposals(drafter, len(candidates), num_found)
        return num_drafts

    def label(self, scheduled: SchedulerOutput) -> None:
        """Record on the step which arm it runs (the runner reads drafter and draft_layers; observe()
        the rest)."""
        drafter, k = self.arm
        scheduled.drafter, scheduled.draft_len = drafter, k
        proposer = self.proposers.get(drafter)
        scheduled.draft_layers = getattr(proposer, "num_layers", 0) if scheduled.num_draft_tokens else 0

    def observe(
        self, scheduled: SchedulerOutput, output: RunnerOutput, seconds: float | None
    ) -> tuple[int, int, int]:
        """Feed the step to the policy (`seconds` None: its time is not a step's, only its acceptance
        counts); returns (sequences that drafted, drafted tokens, accepted)."""
        arm = (scheduled.drafter, scheduled.draft_len) if scheduled.draft_len else OFF
        num_sequences = sum(1 for seq in scheduled.sequences if seq.sample)
        computes_prompt = any(seq.computes_prompt for seq in scheduled.sequences)
        if seconds is not None and not computes_prompt:  # a prompt chunk's time says nothing of decoding
            self.policy.observe_step(arm, num_sequences, scheduled.num_batched_tokens, seconds)
        if not scheduled.num_draft_tokens:
            return 0, 0, 0
        accepted_by_id = {
            request_id: len(output.accepted_token_ids[i]) if output.accepted_token_ids else 0
            for i, request_id in enumerate(output.request_ids)
        }
        num_drafts = num_drafted = num_accepted = 0
        for seq in scheduled.sequences:
            if seq.num_draft_tokens and seq.request_id in accepted_by_id:
                accepted = accepted_by_id[seq.request_id]
                self.policy.observe_request(scheduled.drafter, seq.request_id, seq.num_draft_tokens, accepted)
                num_drafts += 1
                num_drafted += seq.num_draft_tokens
                num_accepted += accepted
        return num_drafts, num_drafted, num_accepted

    def forget(self, request_id: str) -> None:
        for proposer in self.proposers.values():
            proposer.forget(request_id)
        self.policy.forget(request_id)


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
