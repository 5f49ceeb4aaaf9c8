"""Short prompt chunks as one-token decode rows (kernels.cuda_graph_prompt_tokens): which steps are
turned into rows, and that the rows compute what the prefill computes: the same logits at the chunk's
last token and the same K/V in the cache (the eager path on the CPU; test_graph_prompt_rows.py replays
them from CUDA graphs)."""

import numpy as np
import pytest
import torch
import transformers

from adaptserve import LLM
from adaptserve.engine.outputs import ScheduledSequence
from adaptserve.engine.request import SamplingParams
from adaptserve.model.config import ModelArchConfig
from adaptserve.model.loaders import LoadedCheckpoint
from adaptserve.runner.inputs import build_host_batch, prepare_inputs, prompt_chunks_as_decode_rows
from tests.tiny_models import llama3_config

BLOCK_SIZE = 4
RUNNER_BLOCK_SIZE = 8  # the engine's smallest


def _seq(request_id, token_ids, start, blocks, sample=True, drafts=0):
    params = SamplingParams(temperature=0.0)
    return ScheduledSequence(
        request_id, token_ids, start, blocks, sample, params, [1, 2], [], num_draft_tokens=drafts
    )


def test_a_chunk_becomes_causal_rows_and_only_its_last_row_samples():
    decode = _seq("d", [9], 6, [3, 4])
    chunk = _seq("p", [7, 8, 9], 5, [0, 1])
    rows = prompt_chunks_as_decode_rows([decode, chunk], max_chunk_tokens=3)
    assert [(r.request_id, r.token_ids) for r in rows] == [("d", [9]), ("p", [7]), ("p", [8]), ("p", [9])]
    batch = build_host_batch(rows, BLOCK_SIZE)
    assert batch.is_decode_only
    np.testing.assert_array_equal(batch.positions, [6, 5, 6, 7])
    np.testing.assert_array_equal(batch.context_lens, [7, 6, 7, 8])
    np.testing.assert_array_equal(batch.slot_mapping, [4 * 4 + 2, 1 * 4 + 1, 1 * 4 + 2, 1 * 4 + 3])
    np.testing.assert_array_equal(batch.sample_rows, [0, 3])


def test_a_chunk_that_stops_short_of_its_prompt_end_samples_nothing():
    rows = prompt_chunks_as_decode_rows([_seq("p", [7, 8], 0, [0], sample=False)], max_chunk_tokens=8)
    assert len(rows) == 2 and not any(r.sample for r in rows)


def test_a_verify_step_with_a_chunk_keeps_every_draft_row_sampled():
    verify = _seq("v", [4, 5, 6], 3, [2], drafts=2)
    chunk = _seq("p", [7, 8], 0, [0])
    rows = prompt_chunks_as_decode_rows([_seq("d", [9], 6, [3, 4]), verify, chunk], max_chunk_tokens=8)
    assert [(r.request_id, r.token_ids, r.sample) for r in rows] == [
        ("d", [9], True),
        ("v", [4], True),
        ("v", [5], True),
        ("v", [6], True),
        ("p", [7], False),
        ("p", [8], True),
    ]


def test_a_compressed_cache_keeps_fresh_prompts_eager():
    """Its prefill attends to a fresh prompt's exact K/V (rows would read them back quantized); a
    chunk after cached tokens reads the cache either way."""
    fresh, after_hit = _seq("p", [7, 8], 0, [0]), _seq("q", [7, 8], 16, [0, 1])
    assert prompt_chunks_as_decode_rows([fresh], max_chunk_tokens=8, fresh_prompts=False) is None
    assert len(prompt_chunks_as_decode_rows([after_hit], max_chunk_tokens=8, fresh_prompts=False)) == 2
    assert len(prompt_chunks_as_decode_rows([fresh], max_chunk_tokens=8)) == 2


def test_steps_that_stay_as_they_are():
    long_chunk = _seq("p", [7, 8, 9], 0, [0])
    assert prompt_chunks_as_decode_rows([long_chunk], max_chunk_tokens=2) is None
    assert prompt_chunks_as_decode_rows([_seq("d", [9], 6, [3, 4])], max_chunk_tokens=8) is None  # decodes
    verify = _seq("v", [4, 5], 3, [2], drafts=1)
    assert prompt_chunks_as_decode_rows([verify], max_chunk_tokens=8) is None  # verify_as_decode_rows' job


def _runner(kv_format: str = "bf16"):
    config = llama3_config()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    checkpoint = LoadedCheckpoint(
        ModelArchConfig.from_hf_config(config.to_dict()), hf.state_dict(), None, "tiny"
    )
    llm = LLM.from_checkpoint(
        checkpoint,
        dtype="float32",
        device="cpu",
        num_blocks=64,
        block_size=RUNNER_BLOCK_SIZE,
        kv_format=kv_format,
        kv_int4_group_size=16,  # the tiny model's head_dim
    )
    runner = llm.engine.runner
    if runner.compressed_kv is not None:
        runner.compressed_kv.apply([(0, kv_format)], [])  # blocks 0 and 1 lie in chunk 0
    return runner


@torch.inference_mode()
def _forward(runner, sequences):
    """The runner's eager forward of these shares -> logits of their sampled rows [N, V]."""
    inputs = prepare_inputs(sequences, RUNNER_BLOCK_SIZE, runner.device)
    return runner._eager_logits(inputs)(runner.precision.peek())


PROMPT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
BLOCKS = [0, 1]  # slots 0..15


def test_rows_compute_the_prefill_logits_and_kv():
    runner = _runner()
    _forward(runner, [_seq("p", PROMPT[:6], 0, BLOCKS, sample=False)])  # the cached prefix
    chunk = _seq("p", PROMPT[6:], 6, BLOCKS)
    expected = _forward(runner, [chunk])  # [1, V] at the prompt's last token
    expected_kv = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    for k, v in runner.kv_caches:  # the chunk's slots (6..10) are written again by the rows
        k.view(-1, *k.shape[2:])[6:11] = 0
        v.view(-1, *v.shape[2:])[6:11] = 0
    got = _forward(runner, prompt_chunks_as_decode_rows([chunk], max_chunk_tokens=8))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for (k, v), (ek, ev) in zip(runner.kv_caches, expected_kv, strict=True):
        torch.testing.assert_close(k, ek)
        torch.testing.assert_close(v, ev)


@pytest.mark.parametrize("kv_format", ["int8", "int4", "fp8"])
def test_rows_read_a_compressed_cache_as_the_prefill_does(kv_format):
    """Several rows of one sequence in one decode step over int8/int4/fp8 blocks (the compressed
    decode kernels had only met one row per sequence, or a verify step's)."""
    runner = _runner(kv_format)
    _forward(runner, [_seq("p", PROMPT[:6], 0, BLOCKS, sample=False)])
    chunk = _seq("p", PROMPT[6:], 6, BLOCKS)
    expected = _forward(runner, [chunk])
    got = _forward(runner, prompt_chunks_as_decode_rows([chunk], max_chunk_tokens=8))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_verify_step_with_a_chunk_as_rows_computes_what_the_mixed_step_computes():
    """Drafts of one sequence verified beside another's prompt chunk: the eager mixed step (prefill
    attention) and the rows give the same logits at every draft position and the chunk's last token."""
    runner = _runner()
    other = [31, 32, 33, 34, 35, 36, 37]
    _forward(
        runner, [_seq("p", PROMPT[:6], 0, BLOCKS, sample=False), _seq("q", other[:4], 0, [2], sample=False)]
    )
    verify = _seq("q", other[4:], 4, [2], drafts=2)  # token 35 and drafts 36, 37
    chunk = _seq("p", PROMPT[6:], 6, BLOCKS)
    expected = _forward(runner, [verify, chunk])  # [3 + 1, V]
    got = _forward(runner, prompt_chunks_as_decode_rows([verify, chunk], max_chunk_tokens=8))
    assert got.shape[0] == expected.shape[0] == 4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
