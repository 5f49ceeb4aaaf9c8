"""`bench decode` on the tiny preset, on CPU: the JSON it writes, the floor beside each step time, the
copy bandwidth, and transformers' generators on a random preset."""

import argparse
import dataclasses
import json
import math

import pytest
import torch

from adaptserve.bench.bandwidth import measure_copy_bandwidth
from adaptserve.bench.decode import (
    add_decode_args,
    kv_bytes_per_step,
    markdown_table,
    parse_baselines,
    run_decode_benchmark,
    weight_bytes_per_step,
)
from adaptserve.bench.hf_baseline import TransformersGenerator, transformers_model
from adaptserve.model.config import get_preset
from adaptserve.model.llama import LlamaForCausalLM
from adaptserve.model.loaders import load_checkpoint

ENGINES = ("adaptserve", "transformers-eager", "transformers-static")


@pytest.fixture(scope="module")
def decode_run(tmp_path_factory):
    parser = argparse.ArgumentParser()
    add_decode_args(parser)
    args = parser.parse_args(
        ["--batch-sizes", "1,4", "--context-len", "16", "--steps", "3", "--hf-batch-sizes", "1,4"]
    )
    args.model, args.dtype, args.device, args.max_num_batched_tokens = "tiny", "float32", "cpu", 2048
    args.result_dir = tmp_path_factory.mktemp("results")
    payload = run_decode_benchmark(args)
    return payload, json.loads((args.result_dir / "decode-cpu.json").read_text())


def test_json_has_every_engine_at_every_batch_size(decode_run):
    payload, written = decode_run
    assert written["benchmark"] == "decode" and written["results"] == payload["results"]
    assert {(r["engine"], r["batch_size"]) for r in written["results"]} == {
        (e, b) for e in ENGINES for b in (1, 4)
    }
    assert (written["model"], written["dtype"], written["context_len"], written["steps"]) == (
        "tiny",
        "float32",
        16,
        3,
    )
    assert written["copy_bandwidth_gb_s"] > 0
    for row in written["results"]:
        assert row["step_ms"] > 0 and 0 < row["roofline_fraction"] < 10
        # tokens_per_s is rounded to 0.1 in the JSON, step_ms to 0.0001 ms (which moves tokens_per_s by
        # up to tokens_per_s * 0.00005 / step_ms: 0.2 tokens/s for a 1 ms step of batch 4)
        rounding = 0.051 + row["tokens_per_s"] * 0.00005 / row["step_ms"]
        assert row["tokens_per_s"] == pytest.approx(row["batch_size"] / row["step_ms"] * 1e3, abs=rounding)
    ours = [r for r in written["results"] if r["engine"] == "adaptserve"]
    assert all(len(r["step_ms_samples"]) == 3 for r in ours)  # every timed step


def test_floor_is_the_same_for_every_engine(decode_run):
    payload, _ = decode_run
    arch = get_preset("tiny")
    for batch_size in (1, 4):
        rows = [r for r in payload["results"] if r["batch_size"] == batch_size]
        assert len({r["floor_ms"] for r in rows}) == 1
        assert len({r["kv_bytes"] for r in rows}) == 1
        # (16 + 3 / 2) tokens, 2 layers, K and V, 2 KV heads of 16, float32
        assert rows[0]["kv_bytes"] == batch_size * 35 * 2 * 2 * 2 * 16 * 4 // 2
        assert rows[0]["kv_bytes"] == kv_bytes_per_step(arch, 4, batch_size, 16, 3)
        floor_s = (payload["weight_bytes"] + rows[0]["kv_bytes"]) / (payload["copy_bandwidth_gb_s"] * 1e9)
        assert rows[0]["floor_ms"] == pytest.approx(floor_s * 1e3, rel=0.01)  # bandwidth is rounded


def test_weight_bytes_of_the_tiny_preset_by_hand(decode_run):
    payload, _ = decode_run
    # per layer: qkv 64 x (64 + 2 x 32), o 64 x 64, gate/up/down 3 x 64 x 128, two norms of 64
    per_layer = 64 * 128 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    # + final norm + lm_head 512 x 64 (the tied input embedding is that same matrix)
    assert payload["weight_bytes"] == (2 * per_layer + 64 + 512 * 64) * 4
    assert payload["embedding_row_bytes"] == 0


@pytest.mark.parametrize("name", ["tiny", "qwen3-like"])
def test_weight_bytes_count_every_parameter_read_per_step(name):
    """Biases, q/k norms, untied embeddings: the count equals our model's parameters, with an untied
    input embedding left out (a step reads only the batch's rows of it)."""
    arch = get_preset("tiny")
    if name == "qwen3-like":
        arch = dataclasses.replace(
            arch, architecture="qwen3", tie_word_embeddings=False, qk_norm=True, o_proj_bias=True
        )
        arch.attention_bias = True
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, 64)
    num_params = sum(p.numel() for n, p in model.named_parameters() if "rotary" not in n)
    if not arch.tie_word_embeddings:
        num_params -= model.embed_tokens.weight.numel()
    assert weight_bytes_per_step(arch, 2) == num_params * 2


def test_markdown_table_has_a_row_per_batch_size(decode_run):
    table = markdown_table(decode_run[0]).splitlines()
    assert table[0] == (
        "| batch | adaptserve ms | floor ms | fraction | transformers-eager ms | transformers-static ms |"
    )
    assert [line.split("|")[1].strip() for line in table[2:]] == ["1", "4"]


def test_baselines_parse():
    assert parse_baselines("eager,static") == ["eager", "static"]
    assert parse_baselines("") == parse_baselines("none") == []
    with pytest.raises(ValueError, match="unknown variant"):
        parse_baselines("eager,compiled")


def test_copy_bandwidth_on_cpu_is_positive_and_finite():
    bandwidth = measure_copy_bandwidth("cpu", num_bytes=8 << 20, repeats=3)
    assert bandwidth > 0 and math.isfinite(bandwidth)


@pytest.mark.parametrize("variant", TransformersGenerator.VARIANTS)
def test_transformers_generator_times_greedy_decode(variant):
    model = transformers_model(load_checkpoint("tiny"), torch.float32, "cpu")
    generator = TransformersGenerator(model, variant)
    batch = [[300, 301, 302, 303], [400, 401]]  # different lengths: left padding
    assert generator.time_generate(batch, 2) > 0
    samples = generator.decode_step_samples(batch, steps=2, repeats=2)
    assert len(samples) == 2 and all(math.isfinite(s) for s in samples)
    assert generator.num_compiles_while_timing == 0  # CPU: transformers does not compile
