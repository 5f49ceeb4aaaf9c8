"""Precision policies through the real engine on a random tiny model (CPU)."""

import pytest

from adaptserve import LLM, SamplingParams
from adaptserve.config import ConfigError, EngineConfig

PROMPTS = [[300 + i, 301 + i, 302 + i, 303 + i] for i in range(4)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _run(**options):
    llm = LLM("tiny", device="cpu", kv_cache_memory_gib=0.05, **options)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outputs]


def test_fixed_formats_run_every_step_in_that_format():
    _, native = _run()
    llm, bf16 = _run(precision_policy="bf16")
    runner = llm.engine.runner
    assert set(runner.precision.steps_by_precision) == {"bf16"}
    assert set(runner.format_bytes) == {"native", "bf16"}
    agree = sum(a == b for x, y in zip(native, bf16, strict=True) for a, b in zip(x, y, strict=True))
    assert agree >= 0.8 * 4 * 12  # bf16 weights and activations: nearly the same greedy tokens


def test_adaptive_policy_switches_and_shadows_its_low_precision_steps():
    llm, tokens = _run(precision_policy="adaptive", shadow_rate=1.0)
    precision = llm.engine.runner.precision
    assert all(len(t) == 12 for t in tokens)
    summary = precision.summary()
    assert summary["steps_bf16"] >= 1  # prompt steps run at the top level
    assert 0.0 <= summary["agreement"] <= 1.0
    assert precision.last_score is not None and 0.0 <= precision.last_score <= 1.0


def test_precision_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="precision.precision_policy"):
        EngineConfig.from_flat(precision_policy="fp4")
    with pytest.raises(ConfigError, match="precision.weight_formats"):
        EngineConfig.from_flat(weight_formats=("int8",))
    with pytest.raises(ConfigError, match="precision.shadow_rate"):
        EngineConfig.from_flat(shadow_rate=2.0)
    assert EngineConfig.from_flat(precision_policy="int4").precision.formats_needed() == ("int4",)


def test_kv_memory_pressure_reaches_the_policy():
    # 16 KV blocks of 16 tokens: 4 requests of 4 prompt + up to 12 output tokens hold one block each
    llm = LLM("tiny", device="cpu", num_blocks=16, max_model_len=64, precision_policy="adaptive")
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.engine.runner.precision.memory_pressure == 0.25
