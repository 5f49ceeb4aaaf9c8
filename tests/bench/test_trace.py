import json

import pytest

from adaptserve.bench.trace import TraceWorkload, save_trace
from adaptserve.bench.workloads import RandomWorkload

VOCAB = 1000


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_save_then_replay_is_exact(tmp_path):
    requests = RandomWorkload(VOCAB, 12, 5, 0.5).requests(6, 0)
    times = [0.0, 0.1, 0.1, 0.5, 1.25, 2.0]
    path = tmp_path / "t.jsonl"
    save_trace(path, requests, times)
    replayed = TraceWorkload(str(path), VOCAB).requests(6, 123)
    assert [r.prompt for r in replayed] == [r.prompt for r in requests]
    assert [r.output_len for r in replayed] == [r.output_len for r in requests]
    assert [r.arrival_s for r in replayed] == times


def test_mooncake_lines_share_prefix_blocks_and_use_milliseconds(tmp_path):
    path = _write(
        tmp_path / "m.jsonl",
        [
            {"timestamp": 1000, "input_length": 10, "output_length": 3, "hash_ids": [7, 8, 9]},
            {"timestamp": 1500, "input_length": 9, "output_length": 4, "hash_ids": [7, 8, 2]},
        ],
    )
    a, b = TraceWorkload(path, VOCAB, block_tokens=4).requests(2, 0)
    assert a.prompt_len == 10 and b.prompt_len == 9
    assert a.prompt[:8] == b.prompt[:8]  # hash ids 7 and 8: the same two blocks
    assert a.prompt[8:] != b.prompt[8:9]
    assert (a.arrival_s, b.arrival_s) == (0.0, 0.5)
    again = TraceWorkload(path, VOCAB, block_tokens=4).requests(2, 99)
    assert again[0].prompt == a.prompt  # blocks depend on the hash id only


def test_text_prompts_are_counted_and_lines_without_times_leave_arrivals_open(tmp_path):
    path = _write(
        tmp_path / "x.jsonl",
        [{"prompt": "one two three", "output_len": 2}, {"prompt_len": 5, "output_len": 1}],
    )
    requests = TraceWorkload(path, VOCAB, count_tokens=lambda text: len(text.split())).requests(2, 0)
    assert requests[0].prompt == "one two three" and requests[0].prompt_len == 3
    assert requests[1].prompt_len == 5
    assert all(r.arrival_s is None for r in requests)


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"prompt_len": 5}], "missing output_len or output_length"),
        ([{"prompt_len": 5, "output_len": 0}], "output_len must be an integer >= 1"),
        ([{"output_len": 3}], "missing prompt_len or input_length"),
        ([{"prompt_token_ids": [1, 5000], "output_len": 3}], r"ids in \[0, 1000\)"),
        ([{"prompt": "hi", "output_len": 3}], "needs a tokenizer"),
        (
            [
                {"arrival_s": 1.0, "prompt_len": 2, "output_len": 1},
                {"arrival_s": 0.5, "prompt_len": 2, "output_len": 1},
            ],
            "must not decrease",
        ),
        ([{"arrival_s": -1, "prompt_len": 2, "output_len": 1}], "arrival_s/timestamp must be a number >= 0"),
    ],
)
def test_bad_lines_name_the_line_and_field(tmp_path, records, message):
    path = _write(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError, match=message):
        TraceWorkload(path, VOCAB).requests(len(records), 0)


def test_malformed_json_and_short_traces(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt_len": 3, "output_len": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        TraceWorkload(str(path), VOCAB).requests(2, 0)
    ok = _write(tmp_path / "ok.jsonl", [{"prompt_len": 3, "output_len": 1}])
    with pytest.raises(ValueError, match="has only 1 requests"):
        TraceWorkload(ok, VOCAB).requests(2, 0)
    with pytest.raises(ValueError, match="does not exist"):
        TraceWorkload(str(tmp_path / "none.jsonl"), VOCAB).requests(1, 0)
