"""Scoring sequences straight through a ModelRunner: one causal forward pass over whole sequences
(packed into passes of a bounded size), each position's argmax and the NLL of the next token, in the
format the runner serves. For quality benchmarks that teacher-force text; the engine must be idle
(the passes write KV blocks its bookkeeping does not know of, so prefix caching must be off)."""

from __future__ import annotations

import torch

from adaptserve.engine.outputs import ScheduledSequence
from adaptserve.engine.request import SamplingParams
from adaptserve.runner.inputs import build_host_batch, to_device

LOGIT_ROWS = 512  # logits rows materialised at once: [512, vocab] float32 is 100 MB for SmolLM2


@torch.inference_mode()
def score_sequences(
    runner, sequences: list[list[int]], forward_tokens: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence: (argmax [T], NLL of each next token [T - 1]) from one causal pass over it, in the
    format the runner serves. Sequences are packed into passes of up to `forward_tokens` tokens."""
    results, pack, pack_tokens = [], [], 0
    for ids in sequences:
        if pack and pack_tokens + len(ids) > forward_tokens:
            results += _score_pack(runner, pack)
            pack, pack_tokens = [], 0
        pack.append(ids)
        pack_tokens += len(ids)
    return results + (_score_pack(runner, pack) if pack else [])


def _score_pack(runner, sequences: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if min(len(s) for s in sequences) < 2:
        raise ValueError(
            "each scored sequence needs >= 2 tokens (a 1-token one would be batched as a decode)"
        )
    block_size, next_block, scheduled = runner.block_size, 0, []
    for i, ids in enumerate(sequences):
        num_blocks = -(-len(ids) // block_size)
        block_ids = list(range(next_block, next_block + num_blocks))  # the engine is idle: all blocks free
        scheduled.append(scheduled_sequence(str(i), ids, 0, block_ids, ids, []))
        next_block += num_blocks
    if next_block > runner.num_blocks:
        raise ValueError(f"a scoring pass needs {next_block} KV blocks; the runner has {runner.num_blocks}")
    batch = build_host_batch(scheduled, block_size)  # prefills only: the order is kept
    inputs = to_device(batch, runner.device)
    runner.attention.begin_step(inputs.attn)
    precision = runner.precision.fixed
    hidden = runner.model(
        inputs.input_ids, inputs.positions, runner.kv_caches, inputs.attn, runner.attention, precision
    )  # [T, H]
    targets = torch.roll(inputs.input_ids, -1)  # [T]: row t predicts token t + 1 of its sequence
    argmax = torch.empty_like(inputs.input_ids)  # [T]
    nll = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)  # [T]
    for lo in range(0, len(targets), LOGIT_ROWS):
        logits = runner.model.compute_logits(hidden[lo : lo + LOGIT_ROWS], precision)  # [R, V] float32
        argmax[lo : lo + len(logits)] = logits.argmax(dim=-1)
        log_probs = torch.log_softmax(logits, dim=-1)  # [R, V]
        nll[lo : lo + len(logits)] = -log_probs.gather(1, targets[lo : lo + len(logits), None])[:, 0]
    starts = batch.query_start_loc.tolist()
    return [
        (argmax[s:e].cpu(), nll[s : e - 1].cpu())  # a sequence's last row has no next token
        for s, e in zip(starts[:-1], starts[1:], strict=True)
    ]


def scheduled_sequence(request_id, token_ids, num_computed, block_ids, prompt, output) -> ScheduledSequence:
    return ScheduledSequence(
        request_id=request_id,
        token_ids=list(token_ids),
        num_computed_tokens=num_computed,
        block_ids=block_ids,
        sample=True,
        sampling_params=SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),
        prompt_token_ids=prompt,
        output_token_ids=list(output),
    )
