"""Knobs as data: validation names the knob and the limit; gauges are numbers; the switch log counts."""

import pytest

from adaptserve.adapt.knobs import Decision, Knobs, Switch, SwitchLog, check_knob
from adaptserve.config import EngineConfig


def test_knobs_come_from_the_config():
    config = EngineConfig.from_flat(
        max_num_seqs=16, max_num_batched_tokens=512, long_prefill_token_threshold=128
    )
    knobs = Knobs.from_config(config)
    assert (knobs.max_num_seqs, knobs.max_num_batched_tokens, knobs.prefill_chunk) == (16, 512, 128)
    assert knobs.effective_prefill_chunk() == 128
    assert knobs.replace(prefill_chunk=0).effective_prefill_chunk() == 512


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("max_num_seqs", 0, "max_num_seqs=0 must be an integer >= 1"),
        ("max_num_batched_tokens", 1.5, "integer >= 1"),
        ("prefill_chunk", -1, "integer >= 0"),
        ("batch_wait_s", 11, r"\[0, 10\]"),
        ("kv_format", "fp4", "not one of"),
        ("no_such_knob", 1, "unknown knob 'no_such_knob'"),
    ],
)
def test_bad_values_name_the_knob_and_the_limit(name, value, message):
    with pytest.raises(ValueError, match=message):
        check_knob(name, value)
    with pytest.raises(ValueError, match=message):
        Decision({name: value}, "test")


def test_gauges_are_numbers_and_choices_are_indices():
    gauges = Knobs(kv_format="int8", spec_mode="ngram").as_gauges()
    assert gauges["kv_format"] == 1.0 and gauges["spec_mode"] == 1.0
    assert gauges["max_num_seqs"] == 64.0
    assert all(isinstance(v, float) for v in gauges.values())


def test_switch_log_counts_by_knob_and_controller_and_keeps_the_last():
    log = SwitchLog(keep=3)
    for i in range(5):
        log.add(Switch(float(i), "max_num_seqs", i, i + 1, "batching", "why"))
    log.add(Switch(5.0, "batch_wait_s", 0.0, 0.1, "batching", "why"))
    assert log.counts == {("max_num_seqs", "batching"): 5, ("batch_wait_s", "batching"): 1}
    assert [s.time for s in log.recent] == [3.0, 4.0, 5.0]
