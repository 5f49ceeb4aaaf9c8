"""The KV-compression flags and the cache config they build: int4k (int4 keys per channel) is opt in,
as a static format or a ladder level, and a misplaced one is refused naming the field."""

from __future__ import annotations

import argparse

import pytest

from adaptserve.config import ConfigError, EngineConfig
from adaptserve.kv_args import add_kv_args, kv_options


def _options(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_kv_args(parser)
    return kv_options(parser.parse_args(list(argv)))


def test_defaults_leave_int4k_out():
    cache = EngineConfig.from_flat(**_options()).cache
    assert cache.kv_format == "bf16" and cache.kv_ladder == ("bf16", "int8", "int4")
    assert not cache.compressed


def test_int4k_as_a_ladder_level_and_as_the_static_format():
    cache = EngineConfig.from_flat(
        **_options("--kv-policy", "adaptive", "--kv-ladder", "bf16,int8,int4k,int4")
    ).cache
    assert cache.kv_ladder == ("bf16", "int8", "int4k", "int4")
    cache = EngineConfig.from_flat(**_options("--kv-format", "int4k")).cache
    assert cache.kv_format == "int4k" and cache.compressed


@pytest.mark.parametrize("ladder", ["bf16,int4,int4k", "bf16,int4k,int8", "bf16,int4k,int4k"])
def test_a_misplaced_int4k_is_refused_naming_the_field(ladder):
    with pytest.raises(ConfigError, match=r"cache\.kv_ladder=.*int4k"):
        EngineConfig.from_flat(**_options("--kv-ladder", ladder))


def test_an_unknown_kv_format_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"cache\.kv_format='int4kk'.*int4k"):
        EngineConfig.from_flat(kv_format="int4kk")


def test_hot_window_defaults_to_one_block_under_the_adaptive_policy_only_and_the_flag_sets_it():
    assert EngineConfig.from_flat(**_options()).cache.hot_window == 0
    assert EngineConfig.from_flat(**_options("--kv-format", "int8")).cache.hot_window == 0
    assert EngineConfig.from_flat(**_options("--kv-policy", "adaptive")).cache.hot_window == 1
    off = EngineConfig.from_flat(**_options("--kv-policy", "adaptive", "--kv-hot-window", "0")).cache
    assert off.hot_window == 0
    cache = EngineConfig.from_flat(**_options("--kv-policy", "adaptive", "--kv-hot-window", "2")).cache
    assert cache.hot_window == 2 and cache.num_recent_blocks == 2  # keep_recent (1) is subsumed


@pytest.mark.parametrize(
    "argv",
    [("--kv-policy", "adaptive", "--kv-hot-window", "-1"), ("--kv-hot-window", "65", "--kv-format", "int8")],
)
def test_a_hot_window_out_of_range_is_refused_naming_the_field(argv):
    with pytest.raises(ConfigError, match=r"cache\.kv_hot_window=.*\[0, 64\]"):
        EngineConfig.from_flat(**_options(*argv))


def test_a_hot_window_on_a_plain_cache_is_refused():
    """A plain bf16 cache never requantizes: a window there would silently do nothing."""
    with pytest.raises(ConfigError, match=r"cache\.kv_hot_window=1 .*compressed"):
        EngineConfig.from_flat(**_options("--kv-hot-window", "1"))
