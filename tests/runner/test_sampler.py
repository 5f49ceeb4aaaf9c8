"""CPU tests of the sampler: greedy, filters, seeds, distributions, penalties and logprobs."""

from __future__ import annotations

import pytest
import torch

from adaptserve.engine.request import SamplingParams
from adaptserve.runner.sampler import (
    Sampler,
    SamplingMetadata,
    _apply_top_k_top_p,
    apply_penalties,
    token_counts,
)

VOCAB = 64


def _metadata(params, prompts=None, outputs=None, seeds=None) -> SamplingMetadata:
    n = len(params)
    seeds = seeds or [None] * n
    return SamplingMetadata(
        params=list(params),
        prompt_token_ids=prompts or [[] for _ in range(n)],
        output_token_ids=outputs or [[] for _ in range(n)],
        generators=[None if s is None else torch.Generator().manual_seed(s) for s in seeds],
    )


def _logits(num_rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # [N, V]


def test_greedy_is_argmax():
    logits = _logits(8)
    expected = logits.argmax(dim=-1).tolist()
    plain = Sampler()(logits, _metadata([SamplingParams(temperature=0)] * 8))
    assert plain.token_ids == expected
    assert plain.logprobs == [None] * 8
    # Asking for logprobs leaves the fast path; the tokens must not change.
    with_logprobs = Sampler()(logits, _metadata([SamplingParams(temperature=0, logprobs=2)] * 8))
    assert with_logprobs.token_ids == expected


def test_top_k_one_is_argmax():
    logits = _logits(32, seed=1)
    out = Sampler()(logits, _metadata([SamplingParams(temperature=1.0, top_k=1)] * 32))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_is_argmax():
    logits = _logits(32, seed=2)
    out = Sampler()(logits, _metadata([SamplingParams(temperature=1.5, top_p=1e-6)] * 32))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def _run_steps(rows, target_index, num_steps=40):
    """Samples `num_steps` steps of a batch; returns the tokens of row `target_index` per step.

    `rows` is a list of (params, seed, logits_seed); each row's logits at step s are fixed by
    (logits_seed, s), so the target row sees the same logits whatever batch it sits in.
    """
    sampler = Sampler()
    metadata = _metadata([p for p, _, _ in rows], seeds=[s for _, s, _ in rows])
    tokens = []
    for step in range(num_steps):
        logits = torch.cat([_logits(1, seed=1000 * ls + step) for _, _, ls in rows])  # [N, V]
        tokens.append(sampler(logits, metadata).token_ids[target_index])
    return tokens


def test_seeded_row_is_independent_of_batch_and_position():
    target = (SamplingParams(temperature=0.9, top_k=20), 1234, 7)
    others = [
        (SamplingParams(temperature=1.0, top_p=0.8), None, 1),  # forces the full-sort path
        (SamplingParams(temperature=0.0), None, 2),
        (SamplingParams(temperature=1.3, min_p=0.05), 99, 3),
        (SamplingParams(temperature=0.7, repetition_penalty=1.3), None, 4),
    ]
    alone = _run_steps([target], 0)
    assert _run_steps([others[0], target, others[1]], 1) == alone
    assert _run_steps([others[2], others[3], others[1], target], 3) == alone
    assert _run_steps([target] + others, 0) == alone
    assert len(set(alone)) > 5  # it really samples


def test_seeded_top_k_with_ties_is_batch_invariant():
    logits_row = torch.zeros(1, VOCAB)  # [1, V]
    logits_row[0, :3] = 1.0  # three tokens tie for best
    target = SamplingParams(temperature=1.0, top_k=2)
    other = SamplingParams(temperature=1.0, top_p=0.5)
    sampler = Sampler()
    alone_meta = _metadata([target], seeds=[5])
    batch_meta = _metadata([other, target], seeds=[None, 5])
    for _ in range(30):
        alone = sampler(logits_row, alone_meta).token_ids[0]
        batched = sampler(torch.cat([_logits(1), logits_row]), batch_meta).token_ids[1]
        assert alone == batched


def test_different_seeds_differ():
    params = SamplingParams(temperature=1.0)
    first = _run_steps([(params, 1, 5)], 0)
    second = _run_steps([(params, 2, 5)], 0)
    assert first != second
    assert _run_steps([(params, 1, 5)], 0) == first


def test_top_k_only_samples_among_best():
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0, 1.8, 0.5, 1.7, 1.0]]).repeat(4000, 1)  # [N, 8]
    out = Sampler()(logits, _metadata([SamplingParams(temperature=2.0, top_k=3)] * 4000))
    assert set(out.token_ids) == {1, 2, 4}


def test_top_p_one_keeps_the_tail_when_another_row_forces_the_sort():
    # The tail's mass underflows: the float cumsum reaches 1.0 after the first token. A top_p = 1
    # row must still keep it, or its tokens would depend on whether a top_p < 1 row shares the batch.
    logits = torch.tensor([[0.0, -40.0, -41.0, -42.0], [0.0, 1.0, 2.0, 3.0]])
    params = [SamplingParams(top_p=1.0), SamplingParams(top_p=0.5)]
    filtered = _apply_top_k_top_p(logits, params)
    assert torch.equal(filtered[0], logits[0])
    assert filtered[1].isinf().sum() == 3


def test_min_p_removes_low_probability_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    logits = probs.log().repeat(4000, 1)  # [N, 5]
    out = Sampler()(logits, _metadata([SamplingParams(temperature=1.0, min_p=0.2)] * 4000))
    assert set(out.token_ids) == {0, 1, 2}  # 0.04 and 0.01 are below 0.2 * 0.5


def _empirical(logits_row: torch.Tensor, params: SamplingParams, num_draws: int = 20_000) -> torch.Tensor:
    torch.manual_seed(0)
    logits = logits_row.repeat(num_draws, 1)  # [N, V]
    out = Sampler()(logits, _metadata([params] * num_draws))
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.shape[1]) / num_draws  # [V]


def test_frequencies_match_softmax_with_temperature():
    logits_row = torch.tensor([1.0, 0.2, -0.5, 0.8, 0.0, -1.5])
    freqs = _empirical(logits_row, SamplingParams(temperature=0.7))
    expected = (logits_row / 0.7).softmax(dim=-1)
    # One draw frequency has std <= sqrt(0.25 / 20k) = 0.0035; allow about 4 sigma.
    assert (freqs - expected).abs().max() < 0.015


def test_frequencies_match_renormalised_top_k_top_p():
    logits_row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    probs = logits_row.softmax(dim=-1)
    # top_k=4 keeps ids 0..3; within them, ids 0 and 1 hold < 0.8 of the mass, id 2 reaches it.
    kept = probs[:4] / probs[:4].sum()
    assert kept[:2].sum() < 0.8 <= kept[:3].sum()
    expected = torch.zeros(6)
    expected[:3] = kept[:3] / kept[:3].sum()
    freqs = _empirical(logits_row, SamplingParams(temperature=1.0, top_k=4, top_p=0.8))
    assert (freqs - expected).abs().max() < 0.015


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0], [1.0, -2.0, 0.5, 0.25, -3.0]])
    original = logits.clone()
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # no penalty: the row must come back untouched
    ]
    metadata = _metadata(params, prompts=[[0, 1], [0, 1]], outputs=[[2, 2, 3], [2, 2, 3]])
    penalised = apply_penalties(logits, metadata)
    # id 0: prompt, positive -> 2 / 2. id 1: prompt, negative -> -1 * 2.
    # id 2: output twice -> 0.5 / 2 - 0.5 * 2 - 0.25. id 3: output once -> -0.5 * 2 - 0.5 - 0.25.
    expected = torch.tensor([[1.0, -2.0, 0.25 - 1.0 - 0.25, -1.0 - 0.5 - 0.25, 3.0], original[1].tolist()])
    torch.testing.assert_close(penalised, expected, rtol=0, atol=1e-6)
    assert torch.equal(logits, original)  # the caller's logits are not modified


def test_frequency_and_presence_ignore_prompt_tokens():
    logits = torch.zeros(1, 4)
    params = [SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)]
    penalised = apply_penalties(logits, _metadata(params, prompts=[[0, 0, 1]], outputs=[[1, 1]]))
    torch.testing.assert_close(penalised, torch.tensor([[0.0, -3.0, 0.0, 0.0]]))


def test_token_counts():
    counts = token_counts([[1, 1, 3], [], [0]], vocab_size=4, device="cpu")
    assert counts.tolist() == [[0, 2, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0)]
    out = Sampler()(logits, _metadata(params, prompts=[[0]]))
    assert out.token_ids == [1]  # 3 / 2 = 1.5 < 2


def test_logprobs_are_raw_and_include_sampled_and_top_n():
    logits = _logits(3, seed=4)
    params = [
        SamplingParams(temperature=2.0, repetition_penalty=1.5, logprobs=3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_k=5, logprobs=0),
    ]
    out = Sampler()(logits, _metadata(params, prompts=[[1, 2, 3]] * 3, seeds=[1, None, 2]))
    raw = logits.log_softmax(dim=-1)  # [N, V]
    assert out.logprobs[1] is None
    top3 = raw[0].topk(3).indices.tolist()
    assert set(out.logprobs[0]) == set(top3) | {out.token_ids[0]}
    assert list(out.logprobs[2]) == [out.token_ids[2]]
    for row in (0, 2):
        for token_id, logprob in out.logprobs[row].items():
            assert logprob == pytest.approx(raw[row, token_id].item(), abs=1e-5)


def test_mixed_batch():
    logits = _logits(5, seed=6)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=11),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, presence_penalty=1.0),
        SamplingParams(temperature=1.2, top_p=0.9, seed=12),
    ]
    outputs = [[], [], [], [int(logits[3].argmax())], []]
    out = Sampler()(logits, _metadata(params, outputs=outputs, seeds=[None, 11, None, None, 12]))
    assert out.token_ids[0] == int(logits[0].argmax())
    penalised_row = logits[3] - torch.nn.functional.one_hot(logits[3].argmax(), VOCAB)  # [V]
    assert out.token_ids[3] == int(penalised_row.argmax())
    for row, seed in ((1, 11), (4, 12)):
        alone = Sampler()(logits[row : row + 1], _metadata([params[row]], seeds=[seed]))
        assert alone.token_ids[0] == out.token_ids[row]
    assert all(0 <= t < VOCAB for t in out.token_ids)


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same number of rows"):
        Sampler()(_logits(3), _metadata([SamplingParams()] * 2))


def test_blocked_token_ids_are_never_sampled_and_logprobs_stay_raw():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0], [0.0, 4.0, 3.0, 0.0]])
    metadata = SamplingMetadata(
        params=[SamplingParams(temperature=0.0, logprobs=1), SamplingParams(temperature=0.0)],
        prompt_token_ids=[[1], [1]],
        output_token_ids=[[], []],
        generators=[None, None],
        blocked_token_ids=[[0], [1, 2]],
    )
    out = Sampler()(logits, metadata)
    assert out.token_ids == [1, 0]  # row 1: 0 and 3 tie after blocking; argmax takes the first
    raw = torch.log_softmax(logits[0], dim=-1)
    assert out.logprobs[0][0] == pytest.approx(raw[0].item())
