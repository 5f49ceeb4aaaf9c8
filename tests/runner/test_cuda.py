"""The same engine on a GPU: parity with transformers in float32 and a bfloat16 batch smoke test."""

import pytest
import torch
import transformers

from adaptserve import LLM, SamplingParams
from adaptserve.model.config import ModelArchConfig
from adaptserve.model.loaders import LoadedCheckpoint
from tests.parity import check_greedy_close, generate_reference
from tests.tiny_models import llama3_config

pytestmark = pytest.mark.cuda


def test_tiny_llama_matches_transformers_on_cuda():
    config = llama3_config()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    checkpoint = LoadedCheckpoint(
        ModelArchConfig.from_hf_config(config.to_dict()), hf.state_dict(), None, "tiny"
    )
    hf = hf.cuda()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 30, 200)]
    reference = generate_reference(hf, prompts, 16)
    for options in ({}, {"max_num_batched_tokens": 32}):
        llm = LLM.from_checkpoint(checkpoint, dtype="float32", device="cuda", num_blocks=64, **options)
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        check_greedy_close([o.outputs[0].token_ids for o in outputs], reference, label=f"cuda {options}")


def test_random_preset_bfloat16_batch_on_cuda():
    llm = LLM("smollm2-135m", dtype="bfloat16", device="cuda", kv_cache_memory_gib=1.0)
    prompts = [[5 + i] * (10 + 7 * i) for i in range(16)]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, ignore_eos=True, seed=7)
    outputs = llm.generate(prompts, params)
    assert all(len(o.outputs[0].token_ids) == 20 for o in outputs)
    again = llm.generate(prompts[3], params)[0].outputs[0].token_ids
    assert again == outputs[3].outputs[0].token_ids  # a seeded request gives the same tokens alone
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.runner.num_blocks
