"""Turn a SchedulerOutput into the flat tensors one forward pass needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptserve.engine.outputs import ScheduledSequence
from adaptserve.kernels.attention.metadata import AttentionMetadata, PrefillSequence


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # [N] rows of the batch whose logits are sampled
    sampled_sequences: list[ScheduledSequence]  # [N] in the order of sample_rows


def order_for_batch(sequences: list[ScheduledSequence]) -> list[ScheduledSequence]:
    """Decodes (one query token) first, then prefills: the layout AttentionMetadata expects."""
    return [s for s in sequences if len(s.token_ids) == 1] + [s for s in sequences if len(s.token_ids) > 1]


def prepare_inputs(sequences: list[ScheduledSequence], block_size: int, device: torch.device) -> ModelInputs:
    sequences = order_for_batch(sequences)
    num_decodes = sum(1 for s in sequences if len(s.token_ids) == 1)
    input_ids: list[int] = []
    positions: list[int] = []
    token_seq_index: list[int] = []
    sample_rows: list[int] = []
    for i, seq in enumerate(sequences):
        num_new = len(seq.token_ids)
        input_ids += seq.token_ids
        positions += range(seq.num_computed_tokens, seq.num_computed_tokens + num_new)
        token_seq_index += [i] * num_new
        if seq.sample:
            sample_rows.append(len(input_ids) - 1)
    block_table = _block_table(sequences)  # [S, max_blocks] on the host
    positions_t = torch.tensor(positions, dtype=torch.int64)  # [T]
    seq_index_t = torch.tensor(token_seq_index, dtype=torch.int64)  # [T]
    slot_mapping = block_table[seq_index_t, positions_t // block_size] * block_size + positions_t % block_size

    decode_blocks = decode_mask = None
    if num_decodes:
        context_lens = torch.tensor([s.num_computed_tokens + 1 for s in sequences[:num_decodes]])  # [N]
        num_blocks = (int(context_lens.max()) + block_size - 1) // block_size
        decode_blocks = block_table[:num_decodes, :num_blocks]  # [N, MB]
        offsets = torch.arange(num_blocks * block_size)  # [L]
        decode_mask = offsets[None, :] < context_lens[:, None]  # [N, L]
        decode_blocks, decode_mask = decode_blocks.to(device), decode_mask.to(device)

    prefills = []
    row = num_decodes
    for i, seq in enumerate(sequences[num_decodes:], start=num_decodes):
        num_new = len(seq.token_ids)
        context_len = seq.num_computed_tokens + num_new
        offsets = torch.arange(context_len)  # [L]
        slots = block_table[i, offsets // block_size] * block_size + offsets % block_size  # [L]
        prefills.append(PrefillSequence(row, num_new, context_len, slots.to(device)))
        row += num_new

    attn = AttentionMetadata(slot_mapping.to(device), num_decodes, decode_blocks, decode_mask, prefills)
    return ModelInputs(
        input_ids=_tensor(input_ids, device),
        positions=positions_t.to(device),
        attn=attn,
        sample_rows=_tensor(sample_rows, device),
        sampled_sequences=[s for s in sequences if s.sample],
    )


def _block_table(sequences: list[ScheduledSequence]) -> torch.Tensor:
    width = max(len(s.block_ids) for s in sequences)
    return torch.tensor(
        [s.block_ids + [0] * (width - len(s.block_ids)) for s in sequences], dtype=torch.int64
    )


def _tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
