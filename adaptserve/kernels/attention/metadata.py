"""What an attention backend needs to know about one step's batch, built once per step by the runner."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSequence:
    """A sequence with more than one query token this step (a prompt or a chunk of one)."""

    query_start: int  # first row of its query tokens in the flat batch
    query_len: int  # query tokens this step
    context_len: int  # tokens it attends to, cached prefix included (>= query_len)
    context_slots: torch.Tensor | None = None  # [context_len] slots of positions 0..context_len-1;
    # None = read them from the dense block table (the runner leaves them to the reference backend)


@dataclass
class AttentionMetadata:
    """Flat batch of T tokens over S sequences: decodes (one query token each) first, then prefills.

    The torch reference reads the per-sequence fields (`decode_*`, `prefills`; derived from the dense
    ones when left None); the kernels read the dense ones (`block_table`, `context_lens`,
    `query_start_loc`), which keep fixed shapes inside a CUDA graph: padded rows have context length 0
    and attend to nothing.
    """

    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to (-1 = skip)
    num_decode_tokens: int  # the first rows of the batch are decode tokens, one per sequence
    decode_block_table: torch.Tensor | None = None  # [num_decodes, max_blocks] block ids, 0-padded
    decode_context_mask: torch.Tensor | None = None  # [num_decodes, max_blocks * block_size] True = attend
    prefills: list[PrefillSequence] = field(default_factory=list)
    block_table: torch.Tensor | None = None  # [S, max_blocks] int32 block ids of every sequence, 0-padded
    context_lens: torch.Tensor | None = None  # [S] int32 tokens each sequence attends to (cached + new)
    query_start_loc: torch.Tensor | None = None  # [S + 1] int32 first query row of each sequence; last = T
    max_query_len: int = 1  # longest query of the step (host int: sizes the prefill grid)
    max_context_len: int = 0  # longest context of the step (host int; an upper bound inside graphs)
