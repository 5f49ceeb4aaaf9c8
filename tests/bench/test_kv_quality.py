"""The KV quality bench on the real SmolLM2: scoring in steps through the cache, a tiny slice of the
quality run, and of the capacity run at a tiny KV budget."""

import json
import math

import pytest
import torch

from adaptserve import LLM
from adaptserve.bench.kv_capacity import measure_kv_capacity
from adaptserve.bench.kv_quality import KVQualitySpec, measure_kv_quality, score_in_steps, summary_table
from adaptserve.bench.precision_quality import text_tokens
from adaptserve.bench.runner_scoring import score_sequences

pytestmark = pytest.mark.slow

SLICE = KVQualitySpec(num_prompts=2, max_tokens=8, num_text_tokens=256, window=128, formats=("int8",))


def _engine(checkpoint, kv_format: str) -> LLM:
    return LLM.from_checkpoint(
        checkpoint,
        device="cpu",
        dtype="float32",
        kv_format=kv_format,
        max_model_len=272,
        num_blocks=32,
        enable_prefix_caching=False,
        autotune="off",
    )


def _text_nll(checkpoint, kv_format: str, windows: list[list[int]]) -> float:
    scored = score_in_steps(_engine(checkpoint, kv_format).engine.runner, windows, kv_format, 16, 2048)
    return sum(float(nll.sum()) for _, nll in scored) / sum(len(nll) for _, nll in scored)


def test_scoring_in_steps_over_the_plain_cache_matches_one_pass(smollm2):
    runner = _engine(smollm2, "bf16").engine.runner
    # lengths that leave a last step of 1 token (scheduled as a decode row) and of a partial block
    sequences = [text_tokens(smollm2.tokenizer, 256)[:n] for n in (49, 40, 7)]
    stepped = score_in_steps(runner, sequences, "bf16", chunk=16, forward_tokens=32)  # two packs
    whole = score_sequences(runner, sequences, forward_tokens=2048)
    for (argmax, nll), (ref_argmax, ref_nll), ids in zip(stepped, whole, sequences, strict=True):
        assert argmax.shape == (len(ids),) and nll.shape == (len(ids) - 1,)
        assert torch.equal(argmax, ref_argmax)
        torch.testing.assert_close(nll, ref_nll, atol=1e-3, rtol=1e-4)


def test_int4_cache_raises_perplexity_over_int8(smollm2):
    ids = text_tokens(smollm2.tokenizer, 256)
    windows = [ids[:128], ids[128:]]
    int8, int4 = _text_nll(smollm2, "int8", windows), _text_nll(smollm2, "int4", windows)
    assert math.exp(int4) > math.exp(int8) * 1.02  # 4 bits a channel, a scale and minimum per 64


def test_int4k_scoring_moves_every_full_block_and_beats_int4(smollm2):
    """int4k is scored as the engine settles it: each block a step fills moves from int8 into int4k
    before the next step reads it; only the partial last blocks stay int8."""
    ids = text_tokens(smollm2.tokenizer, 256)
    windows = [ids[:128], ids[128:200]]  # 8 + 4 full blocks, and 8 tokens of a partial one
    runner = _engine(smollm2, "int4k").engine.runner
    scored = score_in_steps(runner, windows, "int4k", 16, 2048)
    assert runner.compressed_kv.num_requantized_blocks == 8 + 4
    int4k = sum(float(nll.sum()) for _, nll in scored) / sum(len(nll) for _, nll in scored)
    int4 = _text_nll(smollm2, "int4", windows)
    assert math.isfinite(int4k) and math.exp(int4k) < math.exp(int4)


@pytest.fixture(scope="module")
def measured(smollm2):
    return measure_kv_quality(smollm2, SLICE)


def test_quality_result_is_plain_data_with_a_row_per_format(measured):
    assert json.loads(json.dumps(measured)) == measured
    rows = measured["formats"]
    assert list(rows) == ["bf16", "int8"]
    num_tokens = measured["settings"]["num_reference_tokens"]
    assert 0 < num_tokens <= SLICE.num_prompts * SLICE.max_tokens
    for row in rows.values():
        assert row["teacher_forced"]["tokens"] == num_tokens
        assert row["free_running"]["tokens_compared"] <= num_tokens
        assert row["text_tokens_predicted"] == 2 * 127  # two windows of 128 tokens
        assert row["perplexity"] == pytest.approx(math.exp(row["mean_nll"]))
        assert set(row["delta_vs_bf16"]) == {"teacher_forced_agreement", "perplexity", "perplexity_ratio"}
    assert set(measured["seconds"]) == {f"{f}_{phase}" for f in rows for phase in ("generation", "scoring")}
    assert "| int8 |" in summary_table(measured)


def test_bf16_row_is_the_reference(measured):
    bf16, int8 = measured["formats"]["bf16"], measured["formats"]["int8"]
    # scoring 16 tokens a step over the plain cache predicts what the engine's decode steps generated
    assert bf16["teacher_forced"]["agreement"] == 1.0
    assert bf16["free_running"]["identical"] == 1.0
    assert bf16["delta_vs_bf16"]["perplexity"] == 0.0
    assert 5 < bf16["perplexity"] < 100  # Python documentation under a 135M chat model
    assert int8["perplexity"] != bf16["perplexity"]  # the int8 row read its quantized cache
    assert int8["delta_vs_bf16"]["perplexity_ratio"] == pytest.approx(1.0, abs=0.02)


def test_int8_cache_runs_more_sequences_at_the_same_budget(smollm2):
    result = measure_kv_capacity(smollm2, formats=("bf16", "int8"), prompt_tokens=32, max_tokens=4)
    rows = result["formats"]
    assert list(rows) == ["bf16", "bf16_chunked", "int8"]
    bf16, int8 = rows["bf16"], rows["int8"]
    assert bf16["kv_bytes_per_token_per_layer"] == 2 * 2 * 3 * 64  # K and V, 3 heads of 64, 2 bytes
    assert int8["num_blocks"] > 1.9 * bf16["num_blocks"]
    assert int8["peak_running"] > bf16["peak_running"]
    assert [row["write_format"] for row in rows.values()] == ["bf16", "bf16", "int8"]  # bf16 held
    assert [row["layout"] for row in rows.values()] == ["plain", "chunked", "chunked"]
    for row in rows.values():
        assert row["generated_tokens"] == result["settings"]["num_requests"] * 4
    assert json.loads(json.dumps(result)) == result


def test_capacity_refuses_a_whole_block_format(smollm2):
    with pytest.raises(ValueError, match=r"formats=\['int4k'\] take new blocks in another format"):
        measure_kv_capacity(smollm2, formats=("bf16", "int4k"))
