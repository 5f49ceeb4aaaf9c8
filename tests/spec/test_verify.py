"""Exact verification: greedy accepts the target's argmax run; speculative sampling emits tokens
distributed exactly as the target (chi-square over many draws on a tiny vocabulary)."""

import pytest
import torch

from adaptserve.engine.request import SamplingParams
from adaptserve.spec.verify import verify_drafts

GREEDY = SamplingParams(temperature=0.0)


def chi_square_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test of observed counts against expected ones (cells expected >= 5 all here)."""
    statistic = float(((counts - expected) ** 2 / expected).sum())
    dof = len(counts) - 1
    return float(
        torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2))
    )


def one_hot_logits(ids: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.full((len(ids), vocab), -5.0)  # [R, V]
    logits[torch.arange(len(ids)), torch.tensor(ids)] = 5.0
    return logits


def test_greedy_accepts_the_matching_prefix_then_corrects():
    # targets per row: 3, 4, 6, 1 ; drafts 3, 4, 5: two accepted, the third corrected to 6
    out = verify_drafts(one_hot_logits([3, 4, 6, 1]), [[3, 4, 5]], [GREEDY], [None])
    assert out.accepted_token_ids == [[3, 4]] and out.next_token_ids == [6]


def test_greedy_all_accepted_takes_the_bonus_token():
    out = verify_drafts(one_hot_logits([3, 4, 5, 2]), [[3, 4, 5]], [GREEDY], [None])
    assert out.accepted_token_ids == [[3, 4, 5]] and out.next_token_ids == [2]


def test_several_sequences_split_their_rows_in_order():
    logits = one_hot_logits([1, 2, 7, 5, 6])  # seq 0: rows 0-1 (1 draft); seq 1: rows 2-4 (2 drafts)
    out = verify_drafts(logits, [[1], [7, 0]], [GREEDY, GREEDY], [None, None])
    assert out.accepted_token_ids == [[1], [7]] and out.next_token_ids == [2, 5]


def test_row_count_must_match_the_drafts():
    with pytest.raises(ValueError, match="rows"):
        verify_drafts(one_hot_logits([1, 2]), [[1, 2]], [GREEDY], [None])


def _emitted_distribution(target_logits, drafts, draft_probs, params, trials, position):
    """Counts of the token emitted at `position` over `trials` verifications whose earlier tokens
    equal the drafts. With `draft_probs` [k, V] the drafts are sampled from them each trial, as a
    draft model would; without, they are the fixed `drafts` (a deterministic drafter)."""
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(target_logits.shape[1])
    for _ in range(trials):
        if draft_probs is not None:
            drafts = torch.multinomial(draft_probs, 1, generator=generator).squeeze(1).tolist()
        out = verify_drafts(
            target_logits, [drafts], [params], [generator], None if draft_probs is None else [draft_probs]
        )
        tokens = out.accepted_token_ids[0] + [out.next_token_ids[0]]
        if position < len(tokens) and tokens[:position] == drafts[:position]:
            counts[tokens[position]] += 1
    return counts


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_first_token_follows_the_target_distribution(with_draft_probs):
    torch.manual_seed(0)
    vocab = 6
    target_logits = torch.randn(3, vocab) * 1.5  # [k + 1, V]
    params = SamplingParams(temperature=0.8)
    draft_probs = torch.softmax(torch.randn(2, vocab), dim=-1) if with_draft_probs else None  # q
    trials = 6000
    counts = _emitted_distribution(target_logits, [2, 4], draft_probs, params, trials, position=0)
    expected = torch.softmax(target_logits[0] / 0.8, dim=-1) * trials
    assert chi_square_pvalue(counts, expected) > 1e-3


def test_second_token_follows_the_target_given_the_first_was_accepted():
    torch.manual_seed(1)
    vocab = 5
    target_logits = torch.randn(3, vocab)
    params = SamplingParams(temperature=1.0)
    drafts = [1, 3]
    trials = 8000
    counts = _emitted_distribution(target_logits, drafts, None, params, trials, position=1)
    p = torch.softmax(target_logits[1], dim=-1)
    expected = p * counts.sum()
    assert counts.sum() > 500  # the first draft was accepted often enough to test the second
    assert chi_square_pvalue(counts, expected) > 1e-3


def test_a_wrong_verifier_would_fail_the_test():
    """The chi-square check has power: accepting every draft (a broken verifier) is detected."""
    torch.manual_seed(0)
    target_logits = torch.randn(2, 6) * 1.5
    trials = 3000
    counts = torch.zeros(6)
    counts[2] = trials  # what always accepting draft 2 would emit
    expected = torch.softmax(target_logits[0], dim=-1) * trials
    assert chi_square_pvalue(counts, expected) < 1e-6


def test_top_k_is_respected_by_the_residual():
    target_logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0, top_k=2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        out = verify_drafts(target_logits, [[3]], [params], [generator])  # draft outside the top 2
        assert out.accepted_token_ids == [[]] and out.next_token_ids[0] in (0, 1)
