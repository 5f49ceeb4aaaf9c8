"""The host batch a verify step becomes: each drafting sequence as k + 1 one-token decode rows that
keep every other field of the sequence, and the flat arrays built from them."""

import dataclasses

import numpy as np

from adaptserve.engine.outputs import ScheduledSequence
from adaptserve.engine.request import SamplingParams
from adaptserve.runner.inputs import build_host_batch, decode_row, verify_as_decode_rows

BLOCK_SIZE = 4


def _seq(request_id, token_ids, start, blocks, drafts=0, pending=0):
    return ScheduledSequence(
        request_id,
        token_ids,
        start,
        blocks,
        True,
        SamplingParams(temperature=0.0),
        [1, 2],
        [3],
        num_pending_tokens=pending,
        num_draft_tokens=drafts,
    )


def test_a_decode_row_changes_only_its_token_position_and_flags():
    seq = _seq("a", [7, 8, 9], 5, [0, 1], drafts=2, pending=1)
    row = decode_row(seq, 9, 2)
    expected = dataclasses.replace(
        seq, token_ids=[9], num_computed_tokens=7, sample=True, num_pending_tokens=0, num_draft_tokens=0
    )
    assert row == expected  # every field compared: a new ScheduledSequence field must be carried too


def test_verify_rows_attend_causally_over_the_same_block_table():
    drafting = _seq("a", [7, 8, 9], 5, [0, 1], drafts=2)
    plain = _seq("b", [4], 2, [2])
    rows = verify_as_decode_rows([drafting, plain])
    assert [r.token_ids for r in rows] == [[7], [8], [9], [4]]
    batch = build_host_batch(rows, BLOCK_SIZE)
    assert batch.is_decode_only and batch.num_tokens == 4
    np.testing.assert_array_equal(batch.positions, [5, 6, 7, 2])
    np.testing.assert_array_equal(batch.context_lens, [6, 7, 8, 3])
    np.testing.assert_array_equal(batch.slot_mapping, [1 * 4 + 1, 1 * 4 + 2, 1 * 4 + 3, 2 * 4 + 2])
    np.testing.assert_array_equal(batch.sample_rows, [0, 1, 2, 3])


def test_a_step_with_a_prompt_chunk_is_not_turned_into_rows():
    assert verify_as_decode_rows([_seq("a", [7, 8], 0, [0]), _seq("b", [4], 2, [2])]) is None
