"""What DecodeGraphPool._fill leaves in the graphs' static input buffers: the batch's rows, padded
rows that attend to nothing and write to the scratch slot, and nothing of an earlier, larger batch
in the rows a graph reads. The buffers and their pinned mirrors are plain tensors, so this runs on
the CPU."""

from types import SimpleNamespace

import torch

from adaptserve.engine.outputs import PENDING_TOKEN_ID, ScheduledSequence
from adaptserve.engine.request import SamplingParams
from adaptserve.kernels.registry import KernelRegistry
from adaptserve.runner.cuda_graphs import DecodeGraphPool
from adaptserve.runner.inputs import build_host_batch

BLOCK_SIZE, PAD_SLOT, MAX_BLOCKS = 4, 999, 6


def pool() -> DecodeGraphPool:
    return DecodeGraphPool(
        SimpleNamespace(layers=[None, None]),
        [],
        None,
        KernelRegistry(),
        max_batch=8,
        max_blocks=MAX_BLOCKS,
        pad_slot=PAD_SLOT,
        device=torch.device("cpu"),
    )


def decode(token: int, position: int, blocks: list[int]) -> ScheduledSequence:
    return ScheduledSequence(f"r{token}", [token], position, blocks, True, SamplingParams(), [], [])


def fill(graphs: DecodeGraphPool, seqs: list[ScheduledSequence]) -> int:
    batch = build_host_batch(seqs, BLOCK_SIZE)
    size = graphs.bucket(len(seqs))
    graphs._fill(batch, len(seqs), size, batch.block_table.shape[1])
    return size


def test_rows_carry_the_batch_and_padding_attends_to_nothing():
    graphs = pool()
    size = fill(graphs, [decode(11, 5, [3, 7]), decode(12, 2, [4]), decode(13, 9, [5, 6, 8])])
    assert size == 3
    assert graphs.input_ids[:3].tolist() == [11, 12, 13]
    assert graphs.positions[:3].tolist() == [5, 2, 9]
    # position 5 is block 1 (id 7), offset 1; 2 is block 0 (id 4), offset 2; 9 is block 2 (id 8), offset 1
    assert graphs.slot_mapping[:3].tolist() == [7 * 4 + 1, 4 * 4 + 2, 8 * 4 + 1]
    assert graphs.context_lens[:3].tolist() == [6, 3, 10]
    assert graphs.block_table[0, :2].tolist() == [3, 7]
    assert graphs.block_table[2, :3].tolist() == [5, 6, 8]


def test_a_smaller_batch_after_a_larger_one_pads_the_rows_its_graph_reads():
    graphs = pool()
    fill(graphs, [decode(t, t % 4, [t]) for t in range(1, 6)])  # 5 rows
    fill(graphs, [decode(20, 1, [2]), decode(21, 3, [2])])  # 2 rows: the size-2 graph
    fill(graphs, [decode(30, 0, [1]), decode(31, 1, [1]), decode(32, 2, [1])])  # bucket 3, mirror 1 again
    assert graphs.input_ids[:3].tolist() == [30, 31, 32]
    assert graphs.slot_mapping[:3].tolist() == [4, 5, 6]
    assert graphs.context_lens[:3].tolist() == [1, 2, 3]


def test_padded_rows_of_a_bucket_get_the_scratch_slot_and_no_context():
    graphs = pool()
    fill(graphs, [decode(t, t % 4, [t]) for t in range(1, 9)])  # 8 rows: every row real
    graphs.sizes = [4, 8]  # a bucket of 4 for a batch of 3: one padded row
    size = fill(graphs, [decode(40, 0, [1]), decode(41, 0, [2]), decode(42, 0, [3])])
    assert size == 4
    assert graphs.slot_mapping[3].item() == PAD_SLOT
    assert graphs.context_lens[3].item() == 0


def test_padded_rows_never_read_a_pending_placeholder():
    """A row whose token is still on the device holds PENDING_TOKEN_ID in the pinned mirror (the
    device gets the real id by index_copy). When that mirror comes round again for a smaller batch,
    the padded rows must not keep it: an embedding lookup of -1 crashed the H100 (device-side assert)."""
    graphs = pool()
    graphs.sizes = [4, 8]
    pending = ScheduledSequence("p", [PENDING_TOKEN_ID], 3, [1], True, SamplingParams(), [], [], 1)
    fill(graphs, [decode(t, t % 4, [t]) for t in range(1, 4)] + [pending])  # 4 rows, row 3 pending
    fill(graphs, [decode(20, 1, [2])])  # the other mirror
    size = fill(graphs, [decode(30, 0, [1]), decode(31, 1, [1])])  # mirror 0 again: rows 2-3 padded
    assert size == 4
    assert graphs.input_ids[:4].tolist() == [30, 31, 0, 0]
    assert graphs.positions[2:4].tolist() == [0, 0]
    assert graphs.slot_mapping[2:4].tolist() == [PAD_SLOT, PAD_SLOT]


def test_no_row_of_the_buffers_ever_holds_a_pending_placeholder():
    """The whole mirror is sent each step, so rows past a smaller batch's bucket must not keep a
    pending -1 from an earlier, larger batch either: the warm-up of a larger graph's capture reads
    them (the 8B KV ramp's device-side assert after the padded-row fix)."""
    graphs = pool()
    graphs.sizes = [2, 8]
    params = SamplingParams()
    ids = [PENDING_TOKEN_ID]
    pending = [ScheduledSequence(f"p{i}", ids, 3, [1], True, params, [], [], 1) for i in range(6)]
    fill(graphs, [decode(1, 1, [1])] + pending)  # 7 rows in bucket 8, rows 1-6 pending
    fill(graphs, [decode(20, 1, [2])])  # the other mirror
    fill(graphs, [decode(30, 0, [1]), decode(31, 1, [1])])  # mirror 0 again: bucket 2
    assert (graphs.input_ids >= 0).all() and (graphs.positions >= 0).all()
    assert graphs.slot_mapping[2:].eq(PAD_SLOT).all() and graphs.context_lens[2:].eq(0).all()
