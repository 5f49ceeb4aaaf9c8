import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adaptserve.config import ConfigError, EngineConfig
from adaptserve.engine.stats import StepStats
from adaptserve.server.metrics import ServerMetrics


def step(num_drafts, drafted, accepted, draft_len=4):
    return StepStats(
        start_time=0.0,
        step_time=0.01,
        num_scheduled_tokens=drafted + 2,
        num_prefill_tokens=0,
        num_decode_sequences=0,
        num_generation_tokens=accepted + 2,
        num_preemptions=0,
        prefix_cache_queries=0,
        prefix_cache_hits=0,
        num_drafts=num_drafts,
        num_draft_tokens=drafted,
        num_accepted_tokens=accepted,
        drafter="ngram",
        draft_len=draft_len,
    )


def samples(metrics: ServerMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("adaptserve:spec_decode", "adaptserve:knob_draft_len"))
    }


def test_spec_counters_rate_and_mean_length():
    metrics = ServerMetrics("m")
    metrics.record(step(2, 8, 6))
    metrics.record(step(2, 8, 2, draft_len=2))
    values = samples(metrics)
    assert values["adaptserve:spec_decode_num_drafts_total"] == 4
    assert values["adaptserve:spec_decode_num_draft_tokens_total"] == 16
    assert values["adaptserve:spec_decode_num_accepted_tokens_total"] == 8
    assert values["adaptserve:spec_decode_acceptance_rate"] == 0.5
    assert values["adaptserve:spec_decode_mean_acceptance_length"] == 3.0  # 1 + 8 / 4
    assert values["adaptserve:knob_draft_len"] == 2


@pytest.mark.parametrize(
    "options, field",
    [
        ({"spec_method": "eagle"}, "speculative.spec_method"),
        ({"num_speculative_tokens": 0}, "speculative.num_speculative_tokens"),
        ({"num_speculative_tokens": 17}, "speculative.num_speculative_tokens"),
        ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min/prompt_lookup_max"),
    ],
)
def test_bad_speculative_settings_name_the_field_and_limit(options, field):
    with pytest.raises(ConfigError, match=field) as error:
        EngineConfig.from_flat(**options)
    assert "allowed" in str(error.value)
