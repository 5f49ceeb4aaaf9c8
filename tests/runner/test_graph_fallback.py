"""Which captured decode graph a verify step replays (DecodeGraphPool._longer_context_graph): the
exact context bucket's, else the smallest longer one of the same size and precision, else none (the
pool then captures). Pure bookkeeping over the pool's keys, so it runs on the CPU with stand-in
graphs."""

from types import SimpleNamespace

from adaptserve.runner.cuda_graphs import DecodeGraphPool


def pool_with(keys) -> DecodeGraphPool:
    pool = DecodeGraphPool.__new__(DecodeGraphPool)  # no CUDA: only the lookup is under test
    pool.attention = SimpleNamespace(layout=(9, 3, 64))
    pool.graphs = {key: SimpleNamespace(key=key) for key in keys}
    return pool


def test_the_exact_bucket_wins_then_the_smallest_longer_one():
    pool = pool_with([(8, 1024, "native", "a"), (8, 256, "native", "a"), (8, 512, "native", "a")])
    assert pool._longer_context_graph(8, "native", 200).key == (8, 256, "native", "a")
    assert pool._longer_context_graph(8, "native", 300).key == (8, 512, "native", "a")
    assert pool._longer_context_graph(8, "native", 1000).key == (8, 1024, "native", "a")


def test_no_graph_of_that_size_precision_or_a_long_enough_context_means_none():
    pool = pool_with([(8, 512, "native", "a"), (16, 4096, "native", "a"), (8, 4096, "fp8", "a")])
    assert pool._longer_context_graph(8, "native", 600) is None  # only shorter contexts at size 8
    assert pool._longer_context_graph(4, "native", 100) is None  # no graph of size 4
    assert pool._longer_context_graph(8, "fp8", 5000) is None
    assert pool._longer_context_graph(8, "fp8", 100).key == (8, 4096, "fp8", "a")
