"""Decode graphs in pieces (kernels.cuda_graph_pieces): the layer ranges each piece covers, and on a
GPU, replaying the pieces in order gives what eager decoding gives, speculation included."""

import pytest

from adaptserve import LLM
from adaptserve.config import ConfigError, EngineConfig
from adaptserve.runner.cuda_graphs import layer_pieces
from tests.runner.test_graph_prewarm import OPTIONS, check_same, generate, tiny_checkpoint


def test_pieces_cover_every_layer_once_in_order_the_longer_first():
    assert layer_pieces(30, 1) == [(0, 30)]
    assert layer_pieces(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert layer_pieces(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert layer_pieces(2, 5) == [(0, 1), (1, 2)]  # at most one piece per layer
    assert layer_pieces(7, 0) == [(0, 7)]


def test_the_number_of_pieces_is_checked():
    with pytest.raises(ConfigError, match="kernels.cuda_graph_pieces"):
        EngineConfig.from_flat(cuda_graph_pieces=0)
    assert EngineConfig.from_flat(cuda_graph_pieces=3).kernels.cuda_graph_pieces == 3


@pytest.mark.cuda
def test_two_pieces_replay_like_eager_and_like_one_graph():
    checkpoint = tiny_checkpoint()
    expected = generate(LLM.from_checkpoint(checkpoint, cuda_graphs=False, **OPTIONS))
    llm = LLM.from_checkpoint(checkpoint, cuda_graph_pieces=2, **OPTIONS)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.pieces == [(0, 1), (1, 2)]
    assert all(len(graph.pieces) == 2 for graph in graphs.graphs.values())
    check_same(generate(llm), expected)
    check_same(generate(LLM.from_checkpoint(checkpoint, **OPTIONS)), expected)


@pytest.mark.cuda
def test_verify_steps_replay_pieces_like_eager():
    from tests.spec.test_spec_cuda import OPTIONS as SPEC_OPTIONS
    from tests.spec.test_spec_cuda import SPEC, tokens

    checkpoint = tiny_checkpoint()
    plain = tokens(LLM.from_checkpoint(checkpoint, cuda_graphs=False, **SPEC_OPTIONS))
    spec = tokens(LLM.from_checkpoint(checkpoint, cuda_graph_pieces=2, **SPEC_OPTIONS, **SPEC))
    assert spec == plain
