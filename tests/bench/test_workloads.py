import numpy as np
import pytest

from adaptserve.bench.workloads import (
    FIRST_ORDINARY_TOKEN,
    MixedLengthWorkload,
    RandomWorkload,
    SharedPrefixChatWorkload,
    ShareGPTShapedWorkload,
)

VOCAB = 1000


def _ids_valid(requests):
    return all(
        len(r.prompt) == r.prompt_len and all(FIRST_ORDINARY_TOKEN <= t < VOCAB for t in r.prompt)
        for r in requests
    )


@pytest.mark.parametrize(
    "workload",
    [
        RandomWorkload(VOCAB, 32, 8, 0.5),
        ShareGPTShapedWorkload(VOCAB),
        SharedPrefixChatWorkload(VOCAB, system_len=16, turns=3),
        MixedLengthWorkload(VOCAB, long_min_len=300, long_max_len=400),
    ],
    ids=lambda w: type(w).__name__,
)
def test_deterministic_by_seed_and_labelled(workload):
    a, b, c = workload.requests(40, 1), workload.requests(40, 1), workload.requests(40, 2)
    assert len(a) == 40
    assert [(r.prompt, r.output_len) for r in a] == [(r.prompt, r.output_len) for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    assert _ids_valid(a)
    described = workload.describe()
    assert described["name"] and described["rule"]


def test_random_lengths_stay_in_the_range_ratio():
    requests = RandomWorkload(VOCAB, 100, 20, 0.25).requests(500, 0)
    inputs = [r.prompt_len for r in requests]
    outputs = [r.output_len for r in requests]
    assert min(inputs) >= 75 and max(inputs) <= 125 and min(outputs) >= 15 and max(outputs) <= 25
    assert max(inputs) - min(inputs) > 30  # really spread, not constant
    fixed = RandomWorkload(VOCAB, 100, 20).requests(10, 0)
    assert {r.prompt_len for r in fixed} == {100} and {r.output_len for r in fixed} == {20}


def test_sharegpt_shape_means():
    requests = ShareGPTShapedWorkload(VOCAB).requests(4000, 0)
    inputs = np.array([r.prompt_len for r in requests])
    outputs = np.array([r.output_len for r in requests])
    assert 202 * 0.9 < inputs.mean() < 202 * 1.1
    assert 179 * 0.9 < outputs.mean() < 179 * 1.1
    assert inputs.min() >= 4 and inputs.max() <= 1024
    assert np.median(inputs) < inputs.mean()  # right-skewed, as real conversations


def test_shared_prefix_turns_extend_their_history():
    workload = SharedPrefixChatWorkload(VOCAB, system_len=20, turns=3, concurrent_sessions=2)
    requests = workload.requests(12, 0)
    system = requests[0].prompt[:20]
    assert all(r.prompt[:20] == system for r in requests)  # one system prompt for all
    by_session = {}
    for r in requests:
        by_session.setdefault(r.session_id, []).append(r)
    assert len(by_session) == 4 and all(len(turns) == 3 for turns in by_session.values())
    for turns in by_session.values():
        for earlier, later in zip(turns, turns[1:], strict=False):
            # the later prompt holds the earlier prompt, then the reply (output_len tokens), then more
            assert later.prompt[: earlier.prompt_len] == earlier.prompt
            assert later.prompt_len > earlier.prompt_len + earlier.output_len
    # waves of 2 sessions: sessions 0 and 1 finish all turns before sessions 2 and 3 start
    assert [r.session_id for r in requests[:6]] == [0, 1, 0, 1, 0, 1]


def test_mixed_has_the_long_fraction():
    requests = MixedLengthWorkload(VOCAB, long_fraction=0.2, long_min_len=2000, long_max_len=2100).requests(
        1000, 0
    )
    num_long = sum(r.prompt_len >= 2000 for r in requests)
    assert 150 < num_long < 250


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RandomWorkload(VOCAB, 0, 8), "input_len"),
        (lambda: RandomWorkload(VOCAB, 8, 8, 1.5), "random_range_ratio"),
        (lambda: MixedLengthWorkload(VOCAB, long_fraction=2.0), "long_fraction"),
        (lambda: SharedPrefixChatWorkload(VOCAB, turns=0), "turns"),
    ],
)
def test_bad_parameters_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()
