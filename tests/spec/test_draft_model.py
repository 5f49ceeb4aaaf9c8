"""A separate draft model (spec/draft_model.py): greedy output identical to plain decoding with
SmolLM2 drafting for itself (nearly every draft accepted: the draft's cache is in step) and with a
noisy copy of it (rollbacks, plain steps between drafting ones, preemption), whose drafts match a
draft that recomputes every token; sampled tokens distributed as the target's; the draft cache's
bookkeeping; and the errors of a bad configuration."""

import argparse
import dataclasses
import itertools

import pytest
import torch
import transformers

from adaptserve import LLM, SamplingParams
from adaptserve.adapt.speculation import OFF
from adaptserve.config import ConfigError, EngineConfig
from adaptserve.engine.outputs import ScheduledSequence
from adaptserve.model.loaders import LoadedCheckpoint, default_model_path
from adaptserve.runner.sampler import sampling_probs
from adaptserve.spec import draft_model
from adaptserve.spec.draft_model import DraftModelDrafter, _DraftCache, load_draft_checkpoint
from adaptserve.spec.speculator import Speculator
from adaptserve.spec_args import add_spec_args, spec_options
from tests.spec.test_speculative_engine import GROUNDED, OPEN, Recorder, run
from tests.spec.test_verify import chi_square_pvalue
from tests.tiny_models import llama3_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=32)
CONVERSATIONS = GROUNDED + OPEN


@pytest.fixture(scope="module")
def plain_greedy(smollm2):
    return run(smollm2, CONVERSATIONS, GREEDY)[0]


@pytest.fixture(scope="module")
def noisy_smollm2(smollm2):
    """SmolLM2 with noise on its matrices: a separate draft whose drafts are accepted about half the
    time, so steps accept all, some or none of them."""
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        name: tensor + 0.1 * tensor.std() * torch.randn(tensor.shape, generator=generator)
        if tensor.dim() > 1
        else tensor
        for name, tensor in smollm2.state_dict.items()
    }
    return LoadedCheckpoint(smollm2.arch, state_dict, smollm2.tokenizer, "noisy-smollm2")


@pytest.fixture
def noisy_draft(noisy_smollm2, monkeypatch):
    """The noisy SmolLM2 loads as the draft model spec "noisy-smollm2"."""
    load = draft_model.load_checkpoint
    monkeypatch.setattr(
        draft_model,
        "load_checkpoint",
        lambda spec, progress=True: (
            noisy_smollm2 if spec == noisy_smollm2.source else load(spec, progress=progress)
        ),
    )
    return noisy_smollm2.source


def draft_counts(steps) -> tuple[int, int]:
    """(drafted, accepted) tokens of the draft model's steps."""
    steps = [s for s in steps if s.drafter == "draft"]
    return sum(s.num_draft_tokens for s in steps), sum(s.num_accepted_tokens for s in steps)


@pytest.mark.parametrize("adaptive", [False, True])
def test_smollm2_drafting_for_itself_keeps_greedy_output_and_nearly_all_drafts(
    smollm2, plain_greedy, adaptive
):
    options = {"spec_method": "draft", "draft_model": default_model_path(), "spec_adaptive": adaptive}
    spec, steps, llm = run(smollm2, CONVERSATIONS, GREEDY, **options)
    assert spec == plain_greedy
    drafted, accepted = draft_counts(steps)
    assert drafted > 0 and accepted > 0.9 * drafted, (accepted, drafted)
    assert llm.engine.speculator.policy.drafters == ("draft",)
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.runner.num_blocks


def run_with_plain_steps_between(smollm2, draft_spec):
    """Greedy decoding where every third step drafts nothing (the draft misses the tokens of those
    steps), in a KV cache of 12 blocks of 16 tokens: fewer than the requests need, so one is preempted."""
    llm = LLM.from_checkpoint(
        smollm2,
        max_num_seqs=8,
        spec_method="draft",
        draft_model=draft_spec,
        spec_adaptive=False,
        num_blocks=12,
        max_model_len=192,
    )
    llm.engine.runner.draft_model_drafter.max_tokens_per_pass = 48  # prompts catch up in several passes
    step = itertools.count()
    llm.engine.speculator.policy.choose = lambda now, num_sequences: (
        OFF if next(step) % 3 == 2 else ("draft", 4)
    )
    recorder = Recorder()
    llm.engine.stat_loggers.append(recorder)
    outputs = llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], recorder.steps, llm


def test_the_draft_cache_drafts_as_if_the_draft_recomputed_every_token(
    smollm2, plain_greedy, noisy_draft, monkeypatch
):
    """Rollbacks, tokens computed without the draft, and preemption: a draft that keeps its cache
    accepts exactly as many tokens, step by step, as one that recomputes every token each time."""
    spec, steps, llm = run_with_plain_steps_between(smollm2, noisy_draft)
    assert spec == plain_greedy
    assert llm.engine.scheduler.num_preemptions > 0
    drafted, accepted = draft_counts(steps)
    assert 0 < accepted < 0.9 * drafted
    monkeypatch.setattr(DraftModelDrafter, "_num_valid", lambda self, seq: 0)
    again, fresh_steps, _ = run_with_plain_steps_between(smollm2, noisy_draft)
    assert again == plain_greedy
    assert [s.num_accepted_tokens for s in steps] == [s.num_accepted_tokens for s in fresh_steps]


def sequence(num_known: int, block_ids: list[int]) -> ScheduledSequence:
    """A decoding sequence whose tokens are 100, 101, ...; its last known token is computed now."""
    tokens = list(range(100, 100 + num_known))
    return ScheduledSequence(
        "r", tokens[-1:], num_known - 1, block_ids, True, SamplingParams(), tokens[:3], tokens[3:]
    )


def test_the_draft_cache_keeps_the_tokens_that_match_and_the_blocks_they_live_in():
    drafter = DraftModelDrafter(None, None, block_size=4, device=torch.device("cpu"), max_tokens_per_pass=64)
    assert drafter._num_valid(sequence(10, [0, 1, 2])) == 0  # never seen
    # it saw tokens 100..109 and drafted 110, 999 after them
    drafter._caches["r"] = _DraftCache(num_real=10, drafts=[110, 999], block_ids=[0, 1, 2])
    assert drafter._num_valid(sequence(11, [0, 1, 2])) == 10  # all but the last known token
    assert drafter._num_valid(sequence(12, [0, 1, 2])) == 11  # the first draft was accepted
    assert drafter._num_valid(sequence(16, [0, 1, 2, 3])) == 11  # then 111, not 999: rolled back
    assert drafter._num_valid(sequence(16, [0, 5, 2, 3])) == 0  # recomputed in other blocks
    drafter.forget(["r"])
    assert drafter._num_valid(sequence(12, [0, 1, 2])) == 0


@pytest.fixture(scope="module")
def tiny_target_and_draft(tmp_path_factory):
    """A tiny random Llama (transformers) and a draft made of its weights plus noise, as folders."""
    torch.manual_seed(0)
    target = transformers.LlamaForCausalLM(llama3_config()).float().eval()
    draft = transformers.LlamaForCausalLM(llama3_config()).float().eval()
    with torch.no_grad():
        for mine, theirs in zip(draft.parameters(), target.parameters(), strict=True):
            mine.copy_(theirs + 0.3 * theirs.std() * torch.randn_like(theirs))
    folders = tmp_path_factory.mktemp("target"), tmp_path_factory.mktemp("draft")
    target.save_pretrained(folders[0])
    draft.save_pretrained(folders[1])
    return target, *folders


def test_sampled_tokens_follow_the_target_distribution(tiny_target_and_draft):
    """The joint distribution of the first three tokens (the 2nd and 3rd come from one verify step
    of two drafts) against the target's own, from transformers' logits (chi-square)."""
    target, target_folder, draft_folder = tiny_target_and_draft
    params = SamplingParams(temperature=1.5, top_k=3, max_tokens=4, ignore_eos=True)
    prompt = list(range(7, 27))  # more than a block: the prompt's first block is shared by all
    trials = 1500
    torch.manual_seed(0)
    llm = LLM(
        str(target_folder),
        spec_method="draft",
        draft_model=str(draft_folder),
        num_speculative_tokens=2,
        spec_adaptive=False,
        max_num_seqs=256,
        num_blocks=1024,
    )
    outputs = llm.generate([prompt] * trials, params, use_tqdm=False)
    counts: dict[tuple[int, ...], int] = {}
    for output in outputs:
        key = tuple(output.outputs[0].token_ids[:3])
        counts[key] = counts.get(key, 0) + 1
    expected = _joint_probs(target, prompt, params, 3)
    assert set(counts) <= set(expected)
    cells = [[key] for key in expected if expected[key] * trials >= 5]
    small = [key for key in expected if expected[key] * trials < 5]
    cells += [small] if small else []  # pooled: every cell expects at least 5 then
    observed = torch.tensor([sum(counts.get(key, 0) for key in cell) for cell in cells], dtype=torch.float64)
    probs = torch.tensor([sum(expected[key] for key in cell) for cell in cells], dtype=torch.float64)
    assert chi_square_pvalue(observed, probs * trials) > 1e-3
    spec_stats = llm.engine.speculator.policy.acceptance["draft"]
    assert 0 < sum(spec_stats.accepted) < sum(spec_stats.trials)  # both acceptances and rejections happened


def _joint_probs(
    model, prompt: list[int], params: SamplingParams, length: int
) -> dict[tuple[int, ...], float]:
    """P(first `length` tokens) under `model` sampled with `params` (top-k keeps the tree small)."""
    joint = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, p in joint.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1:].float()  # [1, V]
            probs = sampling_probs(logits, [params])[0]  # [V]
            for token in torch.nonzero(probs).flatten().tolist():
                grown[prefix + (token,)] = p * float(probs[token])
        joint = grown
    return joint


def test_a_draft_with_another_vocabulary_is_refused(smollm2):
    with pytest.raises(ConfigError, match=r"speculative.draft_model='tiny' has 512 tokens.*49152"):
        LLM.from_checkpoint(smollm2, spec_method="draft", draft_model="tiny")


def test_a_draft_that_tokenizes_differently_is_refused(smollm2, monkeypatch):
    class ShiftedTokenizer:
        def encode(self, text, add_special_tokens=True):
            return [t + 1 for t in smollm2.tokenizer.encode(text, add_special_tokens)]

    draft = dataclasses.replace(smollm2, tokenizer=ShiftedTokenizer(), source="shifted")
    monkeypatch.setattr(draft_model, "load_checkpoint", lambda spec, progress=True: draft)
    with pytest.raises(ConfigError, match="speculative.draft_model='shifted' tokenizes text differently"):
        load_draft_checkpoint("shifted", smollm2)


@pytest.mark.parametrize(
    "options, limit",
    [
        ({"spec_method": "draft"}, "when spec_method is 'draft'"),
        ({"spec_method": "ngram", "draft_model": "tiny"}, "unless spec_method is 'draft' or 'auto'"),
        ({"spec_method": "draft", "draft_model": "tiny", "kv_format": "int8"}, "compressed KV"),
    ],
)
def test_bad_draft_model_settings_name_the_field_and_limit(options, limit):
    with pytest.raises(ConfigError, match="speculative.draft_model") as error:
        EngineConfig.from_flat(**options)
    assert "allowed" in str(error.value) and limit in str(error.value)


def test_the_speculative_model_flag_sets_the_draft_model():
    parser = argparse.ArgumentParser()
    add_spec_args(parser)
    args = parser.parse_args(["--speculative-method", "draft", "--speculative-model", "tiny"])
    speculative = EngineConfig.from_flat(**spec_options(args)).speculative
    assert speculative.draft_model == "tiny" and speculative.uses_draft_model
    auto = EngineConfig.from_flat(spec_method="auto").speculative
    assert not auto.uses_draft_model  # auto drafts with a draft model only when one is given
    auto.draft_model = "tiny"
    assert Speculator(auto, 30).policy.drafters == ("ngram", "layers15", "layers22", "draft")
