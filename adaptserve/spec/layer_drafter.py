"""Self-speculative drafting: the target's first `num_layers` layers, its final norm and its head
draft k tokens, one pass per token (as in LayerSkip/Draft & Verify, without their fine-tuning).

No second model and no second KV cache: a draft pass writes the first layers' K/V of its token into
the target's own cache, at the position the token will hold. Those entries depend only on earlier
tokens, so the verify pass that follows rewrites them with the same values, and a rejected draft's
entries are rewritten when a real token reaches that position.

Greedy requests draft the argmax; sampled requests draw from the draft's own distribution q (same
temperature, top-k, top-p and min-p as the request), which the verifier needs for exact rejection
sampling, with the request's generator when it is seeded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from adaptserve.engine.outputs import DEVICE_DRAFT_TOKEN_ID, ScheduledSequence
from adaptserve.model.projection import NATIVE
from adaptserve.runner.inputs import build_host_batch, decode_row, to_device
from adaptserve.runner.sampler import sample_from_probs, sampling_probs


class LayerDrafter:
    """draft(sequences) fills the DEVICE_DRAFT_TOKEN_ID placeholders of a step's sequences."""

    def __init__(self, model, kv_caches, attention, block_size: int, device: torch.device):
        self.model, self.kv_caches, self.attention = model, kv_caches, attention
        self.block_size, self.device = block_size, device

    def draft(
        self,
        sequences: list[ScheduledSequence],
        num_layers: int,
        generator_of: Callable[[ScheduledSequence], torch.Generator | None],
    ) -> tuple[list[ScheduledSequence], dict[str, torch.Tensor]]:
        """The sequences with their drafts filled in by the first `num_layers` layers, and the draft
        distributions [k, V] of sampled requests by request id (greedy drafts: no entry)."""
        if not 1 <= num_layers < len(self.model.layers):
            raise ValueError(f"draft layers must be in [1, {len(self.model.layers) - 1}], got {num_layers}")
        todo = [
            i
            for i, s in enumerate(sequences)
            if s.num_draft_tokens and s.token_ids[-1] == DEVICE_DRAFT_TOKEN_ID
        ]
        if not todo:
            return sequences, {}
        tokens = {i: list(sequences[i].token_ids) for i in todo}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in todo}
        for j in range(max(sequences[i].num_draft_tokens for i in todo)):
            active = [i for i in todo if sequences[i].num_draft_tokens > j]
            rows = [decode_row(sequences[i], tokens[i][j], j) for i in active]
            for i, (token_id, q) in zip(
                active, self._next_tokens(rows, num_layers, generator_of), strict=True
            ):
                tokens[i][j + 1] = token_id
                if q is not None:
                    probs[i].append(q)
        drafted = list(sequences)
        for i in todo:
            drafted[i] = dataclasses.replace(sequences[i], token_ids=tokens[i])
        draft_probs = {sequences[i].request_id: torch.cat(probs[i]) for i in todo if probs[i]}
        return drafted, draft_probs

    def _next_tokens(
        self, rows: list[ScheduledSequence], num_layers: int, generator_of
    ) -> list[tuple[int, torch.Tensor | None]]:
        inputs = to_device(build_host_batch(rows, self.block_size), self.device)
        self.attention.begin_step(inputs.attn)
        hidden = self.model(
            inputs.input_ids,
            inputs.positions,
            self.kv_caches,
            inputs.attn,
            self.attention,
            NATIVE,
            num_layers=num_layers,
        )  # [A, H]
        return draw_drafts(self.model.compute_logits(hidden), rows, generator_of)  # logits [A, V]


def draw_drafts(
    logits: torch.Tensor,
    rows: list[ScheduledSequence],
    generator_of: Callable[[ScheduledSequence], torch.Generator | None],
) -> list[tuple[int, torch.Tensor | None]]:
    """One draft per row of `logits` [A, V]: the argmax for greedy rows; for sampled rows a draw
    from q (the row's temperature, top-k, top-p, min-p) and q [1, V] itself, for the verifier."""
    ids = logits.argmax(dim=-1)  # [A]
    draft_q: list[torch.Tensor | None] = [None] * len(rows)
    for r, row in enumerate(rows):
        if not row.sampling_params.is_greedy:
            q = sampling_probs(logits[r : r + 1], [row.sampling_params])  # [1, V]
            ids[r] = sample_from_probs(q, [generator_of(row)])[0]
            draft_q[r] = q
    return list(zip(ids.tolist(), draft_q, strict=True))
