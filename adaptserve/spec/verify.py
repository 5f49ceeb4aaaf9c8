"""Exact verification of drafted tokens against the target model's logits.

A sequence that drafted k tokens d_1..d_k gets k + 1 rows of target logits in one forward pass: row j
(j = 0..k) is the target's distribution p_j for the token after d_1..d_j. Then:

- **greedy** (temperature 0): accept d_{j+1} while it equals argmax p_j; the token after the accepted
  ones is argmax p_a. The output is the one greedy decoding gives, token for token.
- **random** (speculative sampling, Leviathan et al. 2023; Chen et al. 2023): accept d_{j+1} with
  probability min(1, p_j(d) / q_j(d)), where q_j is the draft's distribution (one-hot for a
  deterministic drafter such as n-gram lookup, so the test is u < p_j(d)). At the first rejection the
  token is drawn from the residual max(p_j - q_j, 0), renormalized; if all k are accepted, a bonus token
  is drawn from p_k. Every emitted token is then distributed exactly as the target's p.

p_j is the distribution the sampler draws from (temperature, top-k, top-p and min-p applied), so
speculation changes speed, never what is sampled. Penalties and blocked tokens depend on the tokens
before each row; sequences that use them are not given drafts (see spec/speculator.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptserve.engine.request import SamplingParams
from adaptserve.runner.sampler import sample_from_probs, sampling_probs


@dataclass
class Verified:
    """Per sequence: the drafts it accepted and the one token sampled after them."""

    accepted_token_ids: list[list[int]]
    next_token_ids: list[int]


def verify_drafts(
    logits: torch.Tensor,
    draft_token_ids: list[list[int]],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    draft_probs: list[torch.Tensor | None] | None = None,
) -> Verified:
    """`logits` [R, V] float32 holds len(drafts_i) + 1 consecutive rows per sequence i, in order.
    `draft_probs[i]`, when given, is the draft distribution [k_i, V] sequence i's drafts were sampled
    from (None: deterministic drafts). Waits on the device (the accepted lengths decide what follows)."""
    counts = [len(d) + 1 for d in draft_token_ids]
    if logits.shape[0] != sum(counts):
        raise ValueError(f"logits have {logits.shape[0]} rows; the drafts need {sum(counts)}")
    starts = [sum(counts[:i]) for i in range(len(counts))]
    draft_probs = draft_probs or [None] * len(draft_token_ids)
    accepted: list[list[int]] = [[] for _ in draft_token_ids]
    next_ids = [0] * len(draft_token_ids)
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    if greedy:
        targets = logits.argmax(dim=-1).tolist()  # [R]
        for i in greedy:
            accepted[i], next_ids[i] = _accept_greedy(
                draft_token_ids[i], targets[starts[i] : starts[i] + counts[i]]
            )
    for i in (i for i, p in enumerate(params) if not p.is_greedy):
        rows = logits[starts[i] : starts[i] + counts[i]]  # [k + 1, V]
        probs = sampling_probs(rows, [params[i]] * counts[i])  # [k + 1, V]
        accepted[i], next_ids[i] = _accept_random(probs, draft_token_ids[i], draft_probs[i], generators[i])
    return Verified(accepted, next_ids)


def _accept_greedy(drafts: list[int], targets: list[int]) -> tuple[list[int], int]:
    """targets[j] = argmax p_j, j = 0..k."""
    num_accepted = 0
    while num_accepted < len(drafts) and drafts[num_accepted] == targets[num_accepted]:
        num_accepted += 1
    return drafts[:num_accepted], targets[num_accepted]


def _accept_random(
    probs: torch.Tensor,
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """probs [k + 1, V] target distributions; draft_probs [k, V] or None (one-hot drafts)."""
    k = len(drafts)
    if k == 0:
        return [], int(sample_from_probs(probs, [generator]).item())
    draft_ids = torch.tensor(drafts, device=probs.device)  # [k]
    target_p = probs[:k].gather(1, draft_ids.unsqueeze(1)).squeeze(1)  # [k]
    if draft_probs is None:
        ratio = target_p  # q(d) = 1
    else:
        draft_p = draft_probs.gather(1, draft_ids.unsqueeze(1)).squeeze(1)  # [k]
        ratio = target_p / draft_p.clamp_min(1e-30)
    uniform = torch.rand(k, generator=generator, device=probs.device)  # [k]
    rejected = (uniform >= ratio).tolist()  # host sync: the accepted length decides the rest
    num_accepted = rejected.index(True) if True in rejected else k
    if num_accepted == k:
        final = probs[k : k + 1]  # [1, V] the bonus token's distribution
    else:
        final = probs[num_accepted : num_accepted + 1].clone()  # [1, V]
        if draft_probs is None:
            final[0, drafts[num_accepted]] = 0.0  # max(p - onehot(d), 0)
        else:
            final = (final - draft_probs[num_accepted : num_accepted + 1]).clamp_min(0.0)
        if float(final.sum()) <= 0.0:  # p == q exactly: rejection had probability 0; keep p
            final = probs[num_accepted : num_accepted + 1]
    next_id = int(sample_from_probs(final, [generator]).item())
    return drafts[:num_accepted], next_id
