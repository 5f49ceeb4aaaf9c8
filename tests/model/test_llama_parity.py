"""Tiny random-weight models against transformers built from the same config and weights."""

import pytest
import torch
import transformers

from adaptserve import LLM, SamplingParams
from tests.parity import check_greedy_close, generate_reference
from tests.tiny_models import llama3_config, qwen2_config, qwen3_config

MAX_NEW = 24


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 5, 17, 40, 133, 250]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["llama3", "qwen3", "qwen2"])
def tiny_model(request, tmp_path_factory):
    config = {"llama3": llama3_config, "qwen3": qwen3_config, "qwen2": qwen2_config}[request.param]()
    torch.manual_seed(0)
    cls = {
        "llama3": transformers.LlamaForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[request.param]
    hf = cls(config).float().eval()
    if request.param == "qwen3":  # q/k norms and biases start at 1 and 0: make them matter
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.3)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    prompts = _prompts(config.vocab_size)
    return request.param, folder, hf, prompts, generate_reference(hf, prompts, MAX_NEW)


@pytest.mark.parametrize(
    "engine_options",
    [
        {},
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 32},
    ],
    ids=["batched", "no-prefix-cache", "chunk-32"],
)
def test_tiny_model_matches_transformers(tiny_model, engine_options):
    name, folder, _, prompts, reference = tiny_model
    llm = LLM(model=str(folder), dtype="float32", num_blocks=128, **engine_options)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    check_greedy_close(batched, reference, label=f"{name} {engine_options}")
    one_by_one = [llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]]
    check_greedy_close(one_by_one, reference[:3], label=f"{name} one at a time")
