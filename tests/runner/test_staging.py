import numpy as np
import pytest
import torch

from adaptserve.runner.staging import PinnedStaging


def test_send_copies_the_filled_prefix_and_leaves_the_rest():
    device_buffer = torch.full((6,), -1, dtype=torch.int64)
    staging = PinnedStaging(device_buffer)
    host = staging.host()
    host[:4] = [5, 6, 7, 8]
    staging.send(3)
    assert device_buffer.tolist() == [5, 6, 7, -1, -1, -1]


def test_mirrors_take_turns_so_the_next_fill_does_not_touch_the_last_one():
    device_buffer = torch.zeros(3, dtype=torch.int32)
    staging = PinnedStaging(device_buffer)
    first = staging.host()
    first[:] = 1
    staging.send(3)
    second = staging.host()
    assert not np.shares_memory(first, second)
    second[:] = 2
    assert first.tolist() == [1, 1, 1]  # what the first copy read is untouched
    staging.send(3)
    assert staging.host() is first
    assert device_buffer.tolist() == [2, 2, 2]


def test_views_of_the_buffer_see_the_copy():
    buffer = torch.zeros(8, dtype=torch.int64)
    ids, positions = buffer.view(2, 4)
    staging = PinnedStaging(buffer)
    host = staging.host().reshape(2, 4)
    host[0] = [1, 2, 3, 4]
    host[1] = [10, 11, 12, 13]
    staging.send(8)
    assert ids.tolist() == [1, 2, 3, 4] and positions.tolist() == [10, 11, 12, 13]


def test_a_non_contiguous_buffer_is_refused():
    with pytest.raises(ValueError, match="contiguous"):
        PinnedStaging(torch.zeros(4, 2)[:, 0])


@pytest.mark.cuda
def test_pinned_copies_reach_the_device_in_order():
    buffer = torch.zeros(4, dtype=torch.int64, device="cuda")
    staging = PinnedStaging(buffer)
    seen = []
    for step in range(5):
        staging.host()[:] = step
        staging.send(4)
        seen.append(buffer.clone())
    assert [s.tolist() for s in seen] == [[step] * 4 for step in range(5)]
