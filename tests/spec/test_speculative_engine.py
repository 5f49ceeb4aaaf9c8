"""Speculative decoding end to end on the real SmolLM2 (CPU): greedy output identical to plain
decoding, far fewer forward passes on input-grounded prompts, sampled runs finish cleanly, and the
counters reach the engine's stats."""

import pytest

from adaptserve import LLM, SamplingParams
from adaptserve.engine.stats import StepStats

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow."
)
GROUNDED = [
    [{"role": "user", "content": f"Repeat this text exactly:\n\n{TEXT}"}],
    [
        {
            "role": "user",
            "content": "Fix the typo in this code and print the whole fixed code:\n\n"
            "def add(a, b):\n    retrun a + b\n\nprint(add(2, 3))\n",
        }
    ],
]
OPEN = [[{"role": "user", "content": "Name three colours."}], [{"role": "user", "content": "What is 2+2?"}]]


class Recorder:
    def __init__(self):
        self.steps: list[StepStats] = []

    def record(self, stats: StepStats) -> None:
        self.steps.append(stats)


def run(smollm2, conversations, params, **options):
    llm = LLM.from_checkpoint(smollm2, max_num_seqs=8, **options)
    recorder = Recorder()
    llm.engine.stat_loggers.append(recorder)
    outputs = llm.chat(conversations, params, use_tqdm=False)
    return [c.token_ids for o in outputs for c in o.outputs], recorder.steps, llm


@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_output_is_identical_with_ngram_speculation(smollm2, adaptive):
    params = SamplingParams(temperature=0.0, max_tokens=48)
    conversations = GROUNDED + OPEN
    plain, plain_steps, _ = run(smollm2, conversations, params)
    spec, spec_steps, _ = run(smollm2, conversations, params, spec_method="ngram", spec_adaptive=adaptive)
    assert spec == plain
    drafted = sum(s.num_draft_tokens for s in spec_steps)
    accepted = sum(s.num_accepted_tokens for s in spec_steps)
    assert drafted > 0 and 0 < accepted <= drafted
    assert sum(s.num_generation_tokens for s in spec_steps) == sum(len(t) for t in spec)
    assert len(spec_steps) < len(plain_steps)


def test_batch_one_grounded_prompt_needs_half_the_forward_passes(smollm2):
    params = SamplingParams(temperature=0.0, max_tokens=64)
    plain, plain_steps, _ = run(smollm2, GROUNDED[:1], params)
    spec, spec_steps, _ = run(smollm2, GROUNDED[:1], params, spec_method="ngram", spec_adaptive=False)
    assert spec == plain
    assert len(spec_steps) * 2 <= len(plain_steps), (len(spec_steps), len(plain_steps))


def test_sampling_with_speculation_finishes_and_is_reproducible_with_a_seed(smollm2):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=40, seed=7)
    first, steps, llm = run(smollm2, GROUNDED, params, spec_method="ngram", spec_adaptive=False)
    assert sum(s.num_draft_tokens for s in steps) > 0
    assert all(1 <= len(t) <= 40 for t in first)
    again = [c.token_ids for o in llm.chat(GROUNDED, params, use_tqdm=False) for c in o.outputs]
    assert again == first
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.runner.num_blocks


def test_requests_that_cannot_speculate_share_steps_with_those_that_do(smollm2):
    """Penalties and logprobs are sampled the usual way inside a verify step."""
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    penalised = SamplingParams(temperature=0.0, max_tokens=32, repetition_penalty=1.3, logprobs=2)
    llm = LLM.from_checkpoint(smollm2, max_num_seqs=8, spec_method="ngram", spec_adaptive=False)
    plain_llm = LLM.from_checkpoint(smollm2, max_num_seqs=8)
    conversations = GROUNDED
    spec_out = llm.chat(conversations, [greedy, penalised], use_tqdm=False)
    plain_out = plain_llm.chat(conversations, [greedy, penalised], use_tqdm=False)
    for a, b in zip(spec_out, plain_out, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert spec_out[1].outputs[0].logprobs is not None
    assert len(spec_out[1].outputs[0].logprobs) == len(spec_out[1].outputs[0].token_ids)


@pytest.mark.parametrize("draft_layers", [8, 24])
def test_self_speculative_layer_drafts_keep_greedy_output_exact(smollm2, draft_layers):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    plain, _, _ = run(smollm2, GROUNDED + OPEN[:1], params)
    options = {"spec_method": "layers", "draft_layers": draft_layers, "spec_adaptive": False}
    spec, steps, llm = run(smollm2, GROUNDED + OPEN[:1], params, **options)
    assert spec == plain
    assert sum(s.num_draft_tokens for s in steps) > 0 and any(s.drafter.startswith("layers") for s in steps)
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.runner.num_blocks


def test_self_speculative_sampling_uses_the_draft_distribution(smollm2):
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=3)
    options = {"spec_method": "layers", "draft_layers": 24, "spec_adaptive": False}
    first, steps, llm = run(smollm2, OPEN, params, **options)
    assert sum(s.num_accepted_tokens for s in steps) > 0
    again = [c.token_ids for o in llm.chat(OPEN, params, use_tqdm=False) for c in o.outputs]
    assert again == first


def test_auto_chooses_among_drafters_and_keeps_greedy_output_exact(smollm2):
    params = SamplingParams(temperature=0.0, max_tokens=40)
    plain, _, _ = run(smollm2, GROUNDED, params)
    options = {"spec_method": "auto", "draft_layers": (12, 24), "spec_adaptive": True}
    spec, steps, llm = run(smollm2, GROUNDED, params, **options)
    assert spec == plain
    policy = llm.engine.speculator.policy
    assert policy.drafters == ("ngram", "layers12", "layers24")
    assert {s.drafter for s in steps} >= {"ngram"}
