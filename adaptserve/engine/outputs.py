"""The plain data that crosses the scheduler ↔ executor boundary each step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from adaptserve.engine.request import SamplingParams

# Stands in for a token the previous step sampled that the host has not read yet (async scheduling);
# `ScheduledSequence.num_pending_tokens` says where they are. Out of range, so a missed fill fails.
PENDING_TOKEN_ID = -1
# Stands in for a draft the runner computes on the device before verifying it (self-speculative
# drafting with the target's first layers); ScheduledSequence.num_draft_tokens counts them.
DEVICE_DRAFT_TOKEN_ID = -2


@dataclass(slots=True)
class ScheduledSequence:
    """One request's share of a step: compute `token_ids`, which start at `num_computed_tokens`."""

    request_id: str
    token_ids: list[int]  # tokens whose K/V (and maybe logits) are computed this step
    num_computed_tokens: int  # position of token_ids[0]; tokens before it are in the cache
    block_ids: list[int]  # the request's whole block table
    sample: bool  # this step reaches its last known token: sample the next one
    sampling_params: SamplingParams
    prompt_token_ids: list[int]  # for repetition penalties
    output_token_ids: list[int]  # generated so far, for penalties
    num_pending_tokens: int = 0  # the last ones of token_ids: sampled last step, known on the device only
    num_draft_tokens: int = 0  # the last ones of token_ids are drafts: verify them (logits at each)

    @property
    def computes_prompt(self) -> bool:
        """A prompt chunk: more tokens than one decode and its drafts."""
        return len(self.token_ids) > self.num_draft_tokens + 1


@dataclass
class SchedulerOutput:
    sequences: list[ScheduledSequence]
    num_batched_tokens: int
    finished_request_ids: list[str] = field(default_factory=list)  # the executor may drop their state
    preempted_request_ids: list[str] = field(default_factory=list)
    drafter: str = ""  # the drafter whose drafts this step verifies ("" = none was asked)
    draft_len: int = 0  # the most drafts per sequence the speculation policy allowed
    draft_layers: int = 0  # layer drafts: the target's first layers that make DEVICE_DRAFT_TOKEN_IDs
    # KV compression: chunks handed to a format, and blocks to copy (requantized) before the step
    kv_chunk_formats: list[tuple[int, str]] = field(default_factory=list)  # (chunk, format)
    kv_migrations: list[tuple[int, int]] = field(default_factory=list)  # (source block, destination block)

    @property
    def is_empty(self) -> bool:
        return not self.sequences

    @property
    def num_draft_tokens(self) -> int:
        return sum(seq.num_draft_tokens for seq in self.sequences)


@dataclass
class RunnerOutput:
    """Tokens sampled this step, one per sequence whose `sample` was set, in the same order.

    A sequence that verified drafts also has its accepted drafts: its new tokens are
    `accepted_token_ids[i] + [sampled_token_ids[i]]` (the last one corrects the first rejected draft
    or follows the last accepted one). An empty `accepted_token_ids` means no drafts were verified."""

    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    accepted_token_ids: list[list[int]] = field(default_factory=list)  # per sequence, or [] for none

    def new_token_ids(self, index: int) -> list[int]:
        """The tokens sequence `index` gained this step, in order."""
        accepted = self.accepted_token_ids[index] if self.accepted_token_ids else []
        return [*accepted, self.sampled_token_ids[index]]


class LaunchedResult(Protocol):
    def result(self) -> RunnerOutput: ...  # waits for the step's sampled tokens


class Executor(Protocol):
    """What the engine needs from whatever runs its steps: the ModelRunner, or the simulator's
    SimulatedExecutor (a cost model and a virtual clock, no weights)."""

    num_blocks: int  # KV blocks it holds
    device: Any  # torch.device or anything with a `.type` ("cpu", "cuda", "sim")
    precision: Any  # has a writable `memory_pressure` (the precision policy's guardrail)

    def warm_up(self) -> None: ...

    def launch(self, scheduler_output: SchedulerOutput) -> LaunchedResult: ...
