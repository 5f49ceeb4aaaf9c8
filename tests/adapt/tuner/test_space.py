"""The tuner's action space (grids, cap, later knobs) and its context vector."""

import numpy as np
import pytest

from adaptserve.adapt.knobs import Knobs
from adaptserve.adapt.snapshot import LatencySummary, TelemetrySnapshot
from adaptserve.adapt.tuner.reward import SLO
from adaptserve.adapt.tuner.space import (
    CONTEXT_NAMES,
    LATER_KNOBS,
    ActionSpace,
    ContextScales,
    KnobSetting,
    context_features,
)


def test_default_grid_drops_redundant_chunks_and_keeps_later_knobs_where_they_are():
    space = ActionSpace.from_grids()
    # 4 seqs x 2 waits x (1 + 2 + 3 + 3) (budget, chunk) pairs with chunk 0 or below the budget
    assert len(space) == 72
    assert all(s["prefill_chunk"] == 0 or s["prefill_chunk"] < s["max_num_batched_tokens"] for s in space)
    for name in LATER_KNOBS:
        assert {s[name] for s in space} == {getattr(Knobs(), name)}
    assert space.index_of(Knobs()) is not None


def test_cap_keeps_an_even_subset_and_the_starting_setting():
    base = Knobs(max_num_seqs=32, max_num_batched_tokens=512, prefill_chunk=256, batch_wait_s=0.01)
    space = ActionSpace.from_grids(base=base, max_settings=10)
    assert len(space) == 10
    assert space.index_of(base) is not None
    assert {s["max_num_seqs"] for s in space} == {16, 32, 64, 128}  # spread over the product, not a corner


def test_a_later_knob_can_get_a_grid():
    space = ActionSpace.from_grids({"kv_format": ("bf16", "int8"), "max_num_seqs": (16, 32)})
    assert {s["kv_format"] for s in space} == {"bf16", "int8"}
    assert space.max_value("max_num_seqs") == 32


def test_bad_grids_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown knob 'max_seqs'"):
        ActionSpace.from_grids({"max_seqs": (1, 2)})
    with pytest.raises(ValueError, match="kv_format"):
        ActionSpace.from_grids({"kv_format": ("fp2",)})
    with pytest.raises(ValueError, match="empty"):
        ActionSpace.from_grids({"max_num_seqs": ()})


def test_knob_setting_is_read_only_and_hashable():
    a = KnobSetting({"max_num_seqs": 16, "batch_wait_s": 0.0})
    b = KnobSetting({"batch_wait_s": 0.0, "max_num_seqs": 16})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(TypeError):
        a.values["max_num_seqs"] = 32
    changes = a.changes()
    changes["max_num_seqs"] = 32  # a copy: the setting does not move
    assert a["max_num_seqs"] == 16


def test_context_is_bounded_and_moves_with_load_and_latency():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    idle = TelemetrySnapshot(time=0.0, window_s=10.0, knobs=Knobs())
    busy = TelemetrySnapshot(
        time=0.0,
        window_s=10.0,
        knobs=Knobs(),
        arrival_rate=40.0,
        waiting_prompt_tokens=10_000,
        num_running=64,
        mean_decode_batch=60.0,
        kv_usage=0.9,
        ttft=LatencySummary(10, 1.0, 1.0, 1.0, 1.0),  # p90 exactly at the SLO
        tpot=LatencySummary(10, 0.3, 0.3, 0.3, 0.3),
    )
    x0, x1 = context_features(idle, slo), context_features(busy, slo, ContextScales())
    assert x0.shape == x1.shape == (len(CONTEXT_NAMES),) and x0.dtype == np.float32
    assert (x0 == 0).all()
    assert ((x1 > 0) & (x1 < 1)).all()
    assert x1[CONTEXT_NAMES.index("ttft_p90_vs_slo")] == pytest.approx(0.5)
    assert x1[CONTEXT_NAMES.index("tpot_p90_vs_slo")] == pytest.approx(0.75)
