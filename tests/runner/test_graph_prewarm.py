"""DecodeGraphPool's prewarm API on a GPU: a batch size released and captured ahead of need replays
the same tokens and logprobs as eager decoding, and one released and then needed is captured on
demand, as before."""

import pytest
import torch
import transformers

from adaptserve import LLM, SamplingParams
from adaptserve.adapt.prewarm import RunnerGraphPool
from adaptserve.model.config import ModelArchConfig
from adaptserve.model.loaders import LoadedCheckpoint
from tests.tiny_models import llama3_config

pytestmark = pytest.mark.cuda

# three prompts decode together (bucket 4); every decode context stays in one power-of-two bucket
# (18..29 tokens -> 32), so a graph captured for a context of 20 is the one each step replays
PROMPTS = [[5 + i] * (17 + i) for i in range(3)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
OPTIONS = {"dtype": "float32", "device": "cuda", "num_blocks": 64, "max_num_seqs": 8}


def tiny_checkpoint() -> LoadedCheckpoint:
    config = llama3_config()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    return LoadedCheckpoint(ModelArchConfig.from_hf_config(config.to_dict()), hf.state_dict(), None, "tiny")


def generate(llm: LLM) -> tuple[list[list[int]], list[list[float]]]:
    outputs = [o.outputs[0] for o in llm.generate(PROMPTS, PARAMS)]
    tokens = [o.token_ids for o in outputs]
    logprobs = [[step[t] for t, step in zip(o.token_ids, o.logprobs, strict=True)] for o in outputs]
    return tokens, logprobs


def check_same(got, expected) -> None:
    (tokens, logprobs), (eager_tokens, eager_logprobs) = got, expected
    assert tokens == eager_tokens
    for ours, reference in zip(logprobs, eager_logprobs, strict=True):
        assert ours == pytest.approx(reference, abs=1e-4)


def test_capture_release_recapture_replays_like_eager():
    checkpoint = tiny_checkpoint()
    expected = generate(LLM.from_checkpoint(checkpoint, cuda_graphs=False, **OPTIONS))

    llm = LLM.from_checkpoint(checkpoint, **OPTIONS)
    runner = llm.engine.runner
    graphs = runner.graphs
    assert graphs is not None, "CUDA graphs are off on this device"
    pool = RunnerGraphPool.from_runner(runner, context_len=20)
    size = graphs.bucket(len(PROMPTS))
    assert size == len(PROMPTS) and size in graphs.captured_sizes()  # the warm-up captured every bucket

    pool.release([size])
    assert size not in graphs.captured_sizes()
    num_captures = graphs.num_captures
    pool.capture([size])
    assert size in graphs.captured_sizes() and graphs.num_captures == num_captures + 1
    check_same(generate(llm), expected)
    assert graphs.num_captures == num_captures + 1  # the steps replayed the prewarmed graph
    assert size in graphs.last_used

    pool.release([size])
    assert size not in graphs.last_used
    check_same(generate(llm), expected)
    assert graphs.num_captures == num_captures + 2  # captured on demand again
    assert size in graphs.captured_sizes()
