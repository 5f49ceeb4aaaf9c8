"""What an attention backend needs to know about one step's batch, built once per step by the runner."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillSequence:
    """A sequence with more than one query token this step (a prompt or a chunk of one)."""

    query_start: int  # first row of its query tokens in the flat batch
    query_len: int  # query tokens this step
    context_len: int  # tokens it attends to, cached prefix included (>= query_len)
    context_slots: torch.Tensor  # [context_len] cache slots of positions 0..context_len-1


@dataclass
class AttentionMetadata:
    """Flat batch of T tokens: decodes (one query token each) first, then prefills."""

    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    num_decode_tokens: int  # the first rows of the batch are decode tokens, one per sequence
    decode_block_table: torch.Tensor | None  # [num_decodes, max_blocks] block ids, padded with 0
    decode_context_mask: torch.Tensor | None  # [num_decodes, max_blocks * block_size] True = attend
    prefills: list[PrefillSequence]
