import random

import pytest

from adaptserve.spec import ngram
from adaptserve.spec.ngram import NgramProposer


def test_longest_suffix_match_wins():
    proposer = NgramProposer(1, 3)
    #   ... 9 2 3 | 5 6 ... and later 1 2 3 | 7 8; the suffix "1 2 3" matches only the second
    tokens = [9, 2, 3, 5, 6, 1, 2, 3, 7, 8, 4, 1, 2, 3]
    assert proposer.propose("a", tokens, 2) == [7, 8]


def test_latest_occurrence_with_a_full_draft_wins():
    proposer = NgramProposer(2, 2)
    tokens = [1, 2, 5, 1, 2, 6, 1, 2]  # "1 2" at 0 (followed by 6 tokens) and at 3 (by 3)
    assert proposer.propose("a", tokens, 2) == [6, 1]
    assert proposer.propose("a", tokens, 4) == [5, 1, 2, 6]  # only the earlier one drafts 4


def test_without_a_full_draft_the_longest_continuation_wins_and_drafts_stop_at_the_end():
    proposer = NgramProposer(2, 2)
    assert proposer.propose("a", [1, 2, 5, 1, 2, 6, 1, 2], 8) == [5, 1, 2, 6, 1, 2]


def test_overlapping_runs_are_matched():
    assert NgramProposer(1, 3).propose("a", [7, 7, 7, 7], 3) == [7]
    # in a long run the match right behind the suffix drafts one token; an earlier one drafts all
    assert NgramProposer(1, 3).propose("b", [7] * 8, 3) == [7, 7, 7]


def test_no_match_and_zero_budget_give_nothing():
    proposer = NgramProposer(1, 4)
    assert proposer.propose("a", [1, 2, 3, 4], 3) == []
    assert proposer.propose("b", [1, 2, 1, 2], 0) == []


def test_the_buffer_follows_growth_and_rewrites():
    proposer = NgramProposer(1, 2)
    tokens = [1, 2, 3, 1]
    assert proposer.propose("a", tokens, 2) == [2, 3]
    tokens += [2, 3]
    assert proposer.propose("a", tokens, 2) == [1, 2]  # "2 3" occurred at 1, followed by 1 2
    assert proposer.propose("a", tokens + [4], 2) == []  # "3 4" and "4" never occurred before
    assert proposer.propose("a", [5, 6, 5], 1) == [6]  # a different (shorter) history: rebuilt
    proposer.forget("a")
    assert "a" not in proposer._tokens


def brute_force(tokens, ngram_min, ngram_max, max_drafts):
    """The rule in plain Python: the longest suffix n-gram with an earlier occurrence; its latest
    occurrence followed by max_drafts tokens, else its earliest."""
    length = len(tokens)
    if max_drafts <= 0:
        return []
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        hits = [s for s in range(length - n) if tokens[s : s + n] == tokens[length - n :]]
        if hits:
            full = [s for s in hits if length - n - s >= max_drafts]
            start = full[-1] if full else hits[0]
            return tokens[start + n : start + n + max_drafts]
    return []


@pytest.mark.parametrize("python_candidates", [0, 8, 10_000])
def test_the_lookup_agrees_with_a_brute_force_scan(monkeypatch, python_candidates):
    """Random histories over 4 symbols (many repeats), growing 1-3 tokens between lookups, sometimes
    cut back (as after a rewrite, seen by the next lookup: a shorter history is rebuilt); candidates
    checked in Python, with numpy, and each as their count decides."""
    monkeypatch.setattr(ngram, "MAX_PYTHON_CANDIDATES", python_candidates)
    rng = random.Random(0)
    proposer = NgramProposer(1, 4)
    for request in range(40):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
        rewritten = False
        for _ in range(30):
            k = rng.randrange(1 if rewritten else 0, 9)
            assert proposer.propose(str(request), tokens, k) == brute_force(tokens, 1, 4, k)
            rewritten = len(tokens) > 2 and rng.random() < 0.1
            if rewritten:
                tokens = tokens[: rng.randrange(1, len(tokens) - 1)] + [rng.randrange(4)]  # shorter
            else:
                tokens = tokens + [rng.randrange(4) for _ in range(rng.randrange(1, 4))]
