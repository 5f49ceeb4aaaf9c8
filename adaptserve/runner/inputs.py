"""Turn a SchedulerOutput into the flat tensors one forward pass needs.

Everything is built on the host with numpy (a few vectorised operations, no per-token Python) and
goes to the device in one copy per tensor; nothing here waits on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adaptserve.engine.outputs import ScheduledSequence
from adaptserve.kernels.attention.metadata import AttentionMetadata, PrefillSequence


@dataclass
class HostBatch:
    """One step's batch on the host, in batch order (decodes first, then prefills)."""

    sequences: list[ScheduledSequence]
    num_decodes: int
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    block_table: np.ndarray  # [S, max_blocks] int32
    context_lens: np.ndarray  # [S] int32
    query_start_loc: np.ndarray  # [S + 1] int32
    sample_rows: np.ndarray  # [N] int64 rows whose logits are sampled (k + 1 for k drafts)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def is_decode_only(self) -> bool:
        return self.num_decodes == len(self.sequences)


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


def verify_as_decode_rows(sequences: list[ScheduledSequence]) -> list[ScheduledSequence] | None:
    """A step of decodes, some verifying k drafts, as one-token rows (`as_decode_rows`); None when
    the step also holds a prompt chunk."""
    if any(s.computes_prompt for s in sequences):
        return None
    return as_decode_rows(sequences)


def prompt_chunks_as_decode_rows(
    sequences: list[ScheduledSequence], max_chunk_tokens: int, fresh_prompts: bool = True
) -> list[ScheduledSequence] | None:
    """A step with short prompt chunks (what a prefix-cache hit leaves to compute, or a short prompt),
    drafts verified beside them or not, as one-token rows (`as_decode_rows`), so that CUDA graphs
    replay it instead of launching every kernel of a prefill from Python. None when no sequence has
    a prompt chunk or one is longer than `max_chunk_tokens`, or, with `fresh_prompts` False, when a
    chunk starts a prompt (a compressed cache's prefill attends to a fresh prompt's exact K/V, and
    its error monitor samples them; rows would read them back quantized)."""
    chunks = [s for s in sequences if s.computes_prompt]
    if not chunks or any(len(s.token_ids) > max_chunk_tokens for s in chunks):
        return None
    if not fresh_prompts and any(s.num_computed_tokens == 0 for s in chunks):
        return None
    return as_decode_rows(sequences)


def as_decode_rows(sequences: list[ScheduledSequence]) -> list[ScheduledSequence]:
    """Every share of a step as one-token rows, in order: token j of a share sits at position
    start + j and attends to start + j + 1 tokens of the same block table, which is exactly causal
    attention. A decode stays one row; a sequence verifying k drafts samples all its k + 1 rows; a
    prompt chunk samples only its last row, and only when it reaches its prompt's end. The step is
    then a plain decode batch (CUDA graphs replay it)."""
    rows = []
    for seq in sequences:
        if len(seq.token_ids) == 1:
            rows.append(seq)
            continue
        last = len(seq.token_ids) - 1
        drafting = seq.num_draft_tokens > 0  # every row's logits are verified
        rows += (
            decode_row(seq, token, j, sample=seq.sample and (drafting or j == last))
            for j, token in enumerate(seq.token_ids)
        )
    return rows


def decode_row(seq: ScheduledSequence, token_id: int, offset: int, sample: bool = True) -> ScheduledSequence:
    """A one-token row of `seq`: `token_id` at position start + offset over the same block table (it
    attends to start + offset + 1 tokens); `sample`: its logits are sampled."""
    # built directly: dataclasses.replace costs about 6x as much, k + 1 times per sequence per step
    return ScheduledSequence(
        seq.request_id,
        [token_id],
        seq.num_computed_tokens + offset,
        seq.block_ids,
        sample,
        seq.sampling_params,
        seq.prompt_token_ids,
        seq.output_token_ids,
    )


def build_host_batch(sequences: list[ScheduledSequence], block_size: int) -> HostBatch:
    sequences = order_for_batch(sequences)
    num_decodes = sum(1 for s in sequences if len(s.token_ids) == 1)
    query_lens = np.fromiter((len(s.token_ids) for s in sequences), np.int64, len(sequences))  # [S]
    starts = np.fromiter((s.num_computed_tokens for s in sequences), np.int64, len(sequences))  # [S]
    query_start_loc = np.zeros(len(sequences) + 1, np.int32)  # [S + 1]
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    if num_decodes == len(sequences):  # the common decode step: one token per sequence
        input_ids = np.fromiter((s.token_ids[0] for s in sequences), np.int64, num_tokens)
        positions, seq_index = starts, np.arange(num_tokens)
    else:
        input_ids = np.fromiter((t for s in sequences for t in s.token_ids), np.int64, num_tokens)
        seq_index = np.repeat(np.arange(len(sequences)), query_lens)  # [T]
        positions = np.arange(num_tokens) - query_start_loc[:-1][seq_index] + starts[seq_index]  # [T]
    block_table = _block_table(sequences)  # [S, MB]
    slots = block_table[seq_index, positions // block_size].astype(np.int64) * block_size  # [T]
    # a sequence's last row; a sequence verifying k drafts also the k rows before it
    sample_rows = np.fromiter(
        (
            row
            for i, s in enumerate(sequences)
            if s.sample
            for row in range(query_start_loc[i + 1] - 1 - s.num_draft_tokens, query_start_loc[i + 1])
        ),
        np.int64,
    )
    return HostBatch(
        sequences=sequences,
        num_decodes=num_decodes,
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slots + positions % block_size,
        block_table=block_table,
        context_lens=(starts + query_lens).astype(np.int32),
        query_start_loc=query_start_loc,
        sample_rows=sample_rows,
    )


def to_device(batch: HostBatch, device: torch.device) -> ModelInputs:
    """The eager path's inputs: tensors sized to this step's batch."""
    prefills = [
        PrefillSequence(
            int(batch.query_start_loc[i]), len(s.token_ids), s.num_computed_tokens + len(s.token_ids)
        )
        for i, s in enumerate(batch.sequences[batch.num_decodes :], start=batch.num_decodes)
    ]
    attn = AttentionMetadata(
        slot_mapping=_to(batch.slot_mapping, device),
        num_decode_tokens=batch.num_decodes,
        prefills=prefills,
        block_table=_to(batch.block_table, device),
        context_lens=_to(batch.context_lens, device),
        query_start_loc=_to(batch.query_start_loc, device),
        max_query_len=int((batch.query_start_loc[1:] - batch.query_start_loc[:-1]).max()),
        max_context_len=int(batch.context_lens.max()),
    )
    return ModelInputs(
        input_ids=_to(batch.input_ids, device),
        positions=_to(batch.positions, device),
        attn=attn,
        sample_rows=_to(batch.sample_rows, device),
        sampled_sequences=[s for s in batch.sequences if s.sample],
    )


def prepare_inputs(sequences: list[ScheduledSequence], block_size: int, device: torch.device) -> ModelInputs:
    return to_device(build_host_batch(sequences, block_size), device)


def _block_table(sequences: list[ScheduledSequence]) -> np.ndarray:
    width = max(len(s.block_ids) for s in sequences)
    table = np.zeros((len(sequences), width), np.int32)  # [S, MB]
    for row, seq in zip(table, sequences, strict=True):
        row[: len(seq.block_ids)] = seq.block_ids
    return table


def host_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` as a CPU tensor to copy to `device`: in pinned memory for CUDA, because a copy from
    pageable memory may wait for the device's queue, which would stall async scheduling."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory() if device.type == "cuda" else tensor


def _to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return host_tensor(array, device).to(device, non_blocking=True)
