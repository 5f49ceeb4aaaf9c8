"""SmolLM2-135M-Instruct from the embedded GGUF: greedy tokens identical to transformers' generate on
the same weights, in float32 — one at a time, in one continuous batch, without prefix caching and with
32-token prefill chunks."""

import pytest
import torch

from adaptserve import LLM, SamplingParams
from adaptserve.bench.hf_baseline import transformers_model
from tests.e2e.prompts import CHAT_CONVERSATIONS, RAW_PROMPTS
from tests.parity import check_greedy_close, generate_reference

MAX_NEW = 64
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts_and_reference(smollm2):
    tok = smollm2.tokenizer
    prompts = [tok.encode(p) for p in RAW_PROMPTS]
    prompts += [tok.encode(tok.apply_chat_template(c), add_special_tokens=False) for c in CHAT_CONVERSATIONS]
    lengths = [len(p) for p in prompts]
    assert sum(n > 600 for n in lengths) >= 2 and min(lengths) < 16, lengths
    hf = transformers_model(smollm2, torch.float32)
    return prompts, generate_reference(hf, prompts, MAX_NEW)


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize(
    "engine_options",
    [
        {},
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 32},
    ],
    ids=["batched", "no-prefix-cache", "chunk-32"],
)
def test_continuous_batch_matches_transformers(smollm2, prompts_and_reference, engine_options):
    prompts, reference = prompts_and_reference
    llm = LLM.from_checkpoint(smollm2, dtype="float32", **engine_options)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    check_greedy_close([o.outputs[0].token_ids for o in outputs], reference, label=str(engine_options))


def test_one_at_a_time_matches_transformers(smollm2, prompts_and_reference):
    prompts, reference = prompts_and_reference
    llm = LLM.from_checkpoint(smollm2, dtype="float32")
    ours = [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    check_greedy_close(ours, reference, label="one at a time")
    # the chat prompts share the template's system prompt: later ones must have read it from the cache
    assert llm.engine.kv_cache.prefix_cache_hits >= 2 * 16


def test_chat_text_is_sensible(smollm2):
    llm = LLM.from_checkpoint(smollm2, dtype="float32")
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=24),
    )
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason in ("stop", "length")
