"""Decode graphs over a compressed KV cache: the pool asks the compressed attention for its one
kernel (graph-safe on the Triton path only), and on a GPU, replayed decodes give what eager decoding
over the same cache gives, with full blocks moving into int4k between replays."""

import pytest

from adaptserve import LLM
from adaptserve.kernels.attention.compressed import CompressedKVAttention
from adaptserve.kernels.registry import DECODE_ATTENTION, ShapeBucket
from tests.runner.test_graph_prewarm import OPTIONS, check_same, generate, tiny_checkpoint

KV = {"kv_format": "int8", "kv_int4_group_size": 16}  # the tiny model's head_dim is 16


def test_the_pool_gets_one_kernel_graph_safe_only_on_the_triton_path():
    bucket = ShapeBucket.of(DECODE_ATTENTION, 4, 100, 4, 2, 32)
    for use_triton in (True, False):
        choice = CompressedKVAttention(2, (4, 2, 32), use_triton=use_triton).decode_kernel()
        variant = choice.choose(bucket)
        assert variant.graph_safe is use_triton
        assert variant.name == ("compressed_kv_triton" if use_triton else "compressed_kv_torch")
        assert choice.choose(ShapeBucket.of(DECODE_ATTENTION, 64, 4000, 4, 2, 32)) is variant
        with pytest.raises(RuntimeError, match="inside CompressedKVAttention.attend"):
            variant.run()


def test_no_graph_pool_on_the_cpu_reference_path():
    llm = LLM.from_checkpoint(tiny_checkpoint(), dtype="float32", num_blocks=64, **KV)
    assert llm.engine.runner.graphs is None


@pytest.mark.cuda
@pytest.mark.parametrize("kv_format", ["int8", "int4k"])
def test_replayed_decodes_match_eager_over_a_compressed_cache(kv_format):
    checkpoint = tiny_checkpoint()
    options = {**OPTIONS, **KV, "kv_format": kv_format}
    expected = generate(LLM.from_checkpoint(checkpoint, cuda_graphs=False, **options))
    llm = LLM.from_checkpoint(checkpoint, **options)
    runner = llm.engine.runner
    graphs = runner.graphs
    assert graphs is not None and runner.attention.use_triton
    assert {key[3] for key in graphs.graphs} == {"compressed_kv_triton"}
    check_same(generate(llm), expected)
    assert graphs.last_used, "no decode step replayed a graph"
    if kv_format == "int4k":  # 17..19-token prompts + 10 tokens: a block fills and moves mid-decode
        assert runner.compressed_kv.num_requantized_blocks > 0
