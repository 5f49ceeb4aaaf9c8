"""A separate draft model: any loadable model with the target's tokenizer drafts k tokens, one pass
per token (Leviathan et al. 2023; vLLM's "draft_model" method).

The draft has its own KV cache, shaped like the target's: as many blocks (and the pad block) of the
same block size, with the draft's own layers, KV heads and head size. KV is per token position, so
the target's block tables and slot mappings address it unchanged. The runner loads the draft before
it sizes the KV cache, and counts the draft's KV bytes in every block (runner/memory.py): the
target gets fewer blocks.

The draft only runs at drafting steps, so it catches up there. Per request it remembers what its
cache holds: the real tokens it had seen, the drafts it ran after them, and the blocks they live in.
Drafts that match the tokens the request really got stay valid; a rejected draft and all after it
do not. One prompt-chunk pass over the tokens the draft has not seen, up to the last known one,
gives the first draft; k - 1 one-token passes give the others. A preempted request, or one whose
blocks changed, starts over from its first token; a finished one is forgotten. A prefix-cache hit
on the target means the draft computes those tokens itself: it writes the same values into the
shared blocks.

Greedy requests draft the argmax; sampled requests draw from the draft's own distribution q, which
the verifier needs for exact rejection sampling (as layer drafts do). Draft passes run eagerly: no
CUDA graphs yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adaptserve.config import ConfigError
from adaptserve.engine.outputs import DEVICE_DRAFT_TOKEN_ID, ScheduledSequence
from adaptserve.model.llama import LlamaForCausalLM
from adaptserve.model.loaders import LoadedCheckpoint, load_checkpoint
from adaptserve.runner.inputs import build_host_batch, decode_row, to_device
from adaptserve.runner.memory import allocate_paged_kv
from adaptserve.spec.layer_drafter import draw_drafts

DRAFTER_NAME = "draft"  # the drafter's name in the speculation policy, metrics and SchedulerOutput.drafter
# encoded by both tokenizers at load: the same ids mean the draft's tokens are the target's
TOKENIZER_PROBE = "Hello, world! The café's 3 keys: 'α', \"β\" and\n\tdef f(x): return x ** 2  # 😀"

GeneratorOf = Callable[[ScheduledSequence], torch.Generator | None]


def load_draft_checkpoint(spec: str, target: LoadedCheckpoint) -> LoadedCheckpoint:
    """The draft model `spec` names (a model spec, as for the target), checked to share the
    target's vocabulary: the same size and, when both carry tokenizers, the same ids for a probe."""
    draft = load_checkpoint(spec, progress=False)
    if draft.arch.vocab_size != target.arch.vocab_size:
        raise ConfigError(
            f"speculative.draft_model={spec!r} has {draft.arch.vocab_size} tokens in its vocabulary, the "
            f"target {target.source!r} {target.arch.vocab_size}; allowed: a draft with the target's "
            f"tokenizer ({target.arch.vocab_size} tokens)"
        )
    if draft.tokenizer is not None and target.tokenizer is not None:
        draft_ids = draft.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
        target_ids = target.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
        if draft_ids != target_ids:
            raise ConfigError(
                f"speculative.draft_model={spec!r} tokenizes text differently from the target "
                f"{target.source!r} ({draft_ids[:8]}... against {target_ids[:8]}...); allowed: a draft "
                "with the target's tokenizer"
            )
    return draft


@dataclass
class _DraftCache:
    """What the draft's KV cache holds for one request: positions 0 .. num_real - 1 are the request's
    tokens, the next ones `drafts`; all of them in the blocks `block_ids` (a prefix of its table)."""

    num_real: int
    drafts: list[int]
    block_ids: list[int]


class DraftModelDrafter:
    """draft(sequences) fills the DEVICE_DRAFT_TOKEN_ID placeholders of a step's sequences with the
    draft model's tokens; forget(request_ids) drops requests that finished or were preempted."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        attention,
        block_size: int,
        device: torch.device,
        max_tokens_per_pass: int,
    ):
        self.model, self.attention = model, attention
        self.block_size, self.device = block_size, device
        self.max_tokens_per_pass = max_tokens_per_pass  # catch-up passes stay within a step's tokens
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._caches: dict[str, _DraftCache] = {}

    def kv_bytes_per_token(self) -> int:
        return self.model.arch.kv_bytes_per_token(self.model.embed_tokens.weight.dtype.itemsize)

    def allocate_kv_caches(self, num_blocks: int) -> None:
        """The draft's cache: `num_blocks` blocks, as many as the target's cache (pad block included)."""
        weight = self.model.embed_tokens.weight
        arch = self.model.arch
        self.kv_caches = allocate_paged_kv(arch, num_blocks, self.block_size, weight.dtype, weight.device)

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._caches.pop(request_id, None)

    def draft(
        self, sequences: list[ScheduledSequence], generator_of: GeneratorOf
    ) -> tuple[list[ScheduledSequence], dict[str, torch.Tensor]]:
        """The sequences with their drafts filled in, and the draft distributions [k, V] of sampled
        requests by request id (greedy drafts: no entry)."""
        todo = [s for s in sequences if s.num_draft_tokens and s.token_ids[-1] == DEVICE_DRAFT_TOKEN_ID]
        if not todo:
            return sequences, {}
        drafts: dict[str, list[int]] = {s.request_id: [] for s in todo}
        probs: dict[str, list[torch.Tensor]] = {s.request_id: [] for s in todo}

        def keep(results: dict[str, tuple[int, torch.Tensor | None]]) -> None:
            for request_id, (token_id, q) in results.items():
                drafts[request_id].append(token_id)
                if q is not None:
                    probs[request_id].append(q)

        keep(self._catch_up(todo, generator_of))
        for j in range(1, max(s.num_draft_tokens for s in todo)):
            rows = [decode_row(s, drafts[s.request_id][j - 1], j) for s in todo if s.num_draft_tokens > j]
            keep(self._forward(rows, generator_of))
        for seq in todo:
            self._caches[seq.request_id] = _DraftCache(
                num_real=seq.num_computed_tokens + 1,
                drafts=drafts[seq.request_id][:-1],  # the last draft is never run through the draft
                block_ids=list(seq.block_ids),
            )
        drafted = [
            dataclasses.replace(s, token_ids=s.token_ids[: -s.num_draft_tokens] + drafts[s.request_id])
            if s.request_id in drafts
            else s
            for s in sequences
        ]
        draft_probs = {request_id: torch.cat(qs) for request_id, qs in probs.items() if qs}  # [k, V] each
        return drafted, draft_probs

    def _catch_up(
        self, sequences: list[ScheduledSequence], generator_of: GeneratorOf
    ) -> dict[str, tuple[int, torch.Tensor | None]]:
        """Run each sequence's tokens that the draft's cache lacks, up to its last known token, in
        passes of at most `max_tokens_per_pass` tokens; the first draft from each one's last row."""
        starts = [(s, self._num_valid(s)) for s in sequences]
        first: dict[str, tuple[int, torch.Tensor | None]] = {}
        while starts:
            budget, rows, rest = self.max_tokens_per_pass, [], []
            for seq, start in starts:
                num_known = seq.num_computed_tokens + 1
                stop = min(num_known, start + max(budget, 0))
                if stop > start:
                    rows.append(
                        dataclasses.replace(
                            seq,
                            token_ids=_known_tokens(seq, start, stop),
                            num_computed_tokens=start,
                            sample=stop == num_known,
                            num_pending_tokens=0,
                            num_draft_tokens=0,
                        )
                    )
                    budget -= stop - start
                if stop < num_known:
                    rest.append((seq, stop))
            first.update(self._forward(rows, generator_of))
            starts = rest
        return first

    def _num_valid(self, seq: ScheduledSequence) -> int:
        """How many of the sequence's first tokens the draft's cache holds, at most all known but
        the last (the first draft pass needs one token to run)."""
        num_known = seq.num_computed_tokens + 1
        if len(seq.prompt_token_ids) + len(seq.output_token_ids) != num_known:
            raise RuntimeError(f"request {seq.request_id}: drafting needs every token on the host")
        cache = self._caches.get(seq.request_id)
        if cache is None or cache.num_real > num_known:
            return 0
        seen = _known_tokens(seq, cache.num_real, min(num_known, cache.num_real + len(cache.drafts)))
        num_matching = next((j for j, token in enumerate(seen) if token != cache.drafts[j]), len(seen))
        num_valid = min(cache.num_real + num_matching, num_known - 1)
        num_blocks = -(-num_valid // self.block_size)
        if seq.block_ids[:num_blocks] != cache.block_ids[:num_blocks]:
            return 0  # recomputed elsewhere (preempted, or its blocks moved): the draft's KV is not there
        return num_valid

    def _forward(
        self, rows: list[ScheduledSequence], generator_of: GeneratorOf
    ) -> dict[str, tuple[int, torch.Tensor | None]]:
        """One eager pass of the draft over `rows`; the next draft of each sampled row, by request id."""
        inputs = to_device(build_host_batch(rows, self.block_size), self.device)
        self.attention.begin_step(inputs.attn)
        hidden = self.model(
            inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn, self.attention
        )  # [T, H]
        logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [N, V]
        sampled = inputs.sampled_sequences
        results = draw_drafts(logits, sampled, generator_of)
        return {row.request_id: result for row, result in zip(sampled, results, strict=True)}


def _known_tokens(seq: ScheduledSequence, start: int, stop: int) -> list[int]:
    """The request's tokens [start, stop): prompt, then output."""
    num_prompt = len(seq.prompt_token_ids)
    outputs = seq.output_token_ids[max(0, start - num_prompt) : max(0, stop - num_prompt)]
    return seq.prompt_token_ids[start:stop] + outputs
