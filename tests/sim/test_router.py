"""Routers pick a replica from each one's load; ties go to the lowest index."""

import pytest

from adaptserve.sim.router import Load, make_router


def test_round_robin_takes_turns_whatever_the_load():
    router = make_router("round_robin")
    loads = [Load(9, 900), Load(0, 0), Load(5, 5)]
    assert [router.choose(loads) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_loaded_counts_requests_and_least_work_counts_tokens():
    loads = [Load(3, 100), Load(1, 5000), Load(2, 50)]
    assert make_router("least_loaded").choose(loads) == 1
    assert make_router("least_work").choose(loads) == 2


def test_ties_go_to_the_lowest_index():
    loads = [Load(2, 10), Load(1, 10), Load(1, 10)]
    assert make_router("least_loaded").choose(loads) == 1
    assert make_router("least_work").choose(loads) == 0


def test_an_unknown_router_is_named_in_the_error():
    with pytest.raises(ValueError, match="unknown router 'fastest'.*least_loaded"):
        make_router("fastest")
