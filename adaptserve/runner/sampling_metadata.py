"""What the sampler needs to know about each row of a step's logits, as plain data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptserve.engine.request import SamplingParams


@dataclass
class SamplingMetadata:
    """Per-row sampling inputs, built by the model runner once per step.

    Row i of the logits belongs to `params[i]`. `generators[i]` is the request's own generator when
    it has a seed (on the logits' device), else None; rows without one share one batched draw.
    """

    params: list[SamplingParams]  # one per row
    prompt_token_ids: list[list[int]]  # per row; only read for the repetition penalty
    output_token_ids: list[list[int]]  # per row, generated so far; read for all penalties
    generators: list[torch.Generator | None]  # per row: own generator when seeded, else None
    blocked_token_ids: list[list[int]] | None = (
        None  # per row: ids it may not sample (stop ids before min_tokens)
    )

    @property
    def num_rows(self) -> int:
        return len(self.params)

    @property
    def all_greedy(self) -> bool:
        return all(p.is_greedy for p in self.params)

    @property
    def needs_penalties(self) -> bool:
        return any(p.has_penalties for p in self.params)

    @property
    def has_blocked_tokens(self) -> bool:
        return self.blocked_token_ids is not None and any(self.blocked_token_ids)

    @property
    def needs_logprobs(self) -> bool:
        return any(p.logprobs is not None for p in self.params)
