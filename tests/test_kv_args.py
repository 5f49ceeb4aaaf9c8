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
