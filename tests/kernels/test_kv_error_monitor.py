"""KVErrorMonitor (kernels/attention/compressed.py): each format's error measured on exact prompt K/V;
int4k's round trip is the cache's settled state (full blocks with per-channel keys, the partial last
block in int8), so keys with outlier channels rank it between int8 and int4."""

from __future__ import annotations

import torch

from adaptserve.engine.kv_cache.formats import KVLayout
from adaptserve.kernels.attention.compressed import KVErrorMonitor, _round_trip

LAYOUT = KVLayout(block_size=16, num_kv_heads=2, head_dim=64, native_dtype=torch.float32)


def _prompt(num_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, 4, 64, generator=g)  # [Q, H, D]
    k = torch.randn(num_tokens, 2, 64, generator=g)  # [Q, KVH, D]
    k[..., [3, 17, 50]] = k[..., [3, 17, 50]] * 8.0 + 4.0  # outlier key channels, as real keys have
    return q, k, torch.randn(num_tokens, 2, 64, generator=g)


def test_int4k_round_trip_is_per_channel_over_full_blocks_and_int8_on_the_tail():
    _, k, v = _prompt(40)  # 2 full blocks and 8 tokens
    k_hat = _round_trip(k, "int4k", LAYOUT, is_key=True)
    v_hat = _round_trip(v, "int4k", LAYOUT, is_key=False)
    assert torch.equal(k_hat[32:], _round_trip(k[32:], "int8", LAYOUT, is_key=True))
    assert torch.equal(v_hat[:32], _round_trip(v[:32], "int4", LAYOUT, is_key=False))
    assert torch.equal(v_hat[32:], _round_trip(v[32:], "int8", LAYOUT, is_key=False))
    error = ((k_hat[:32] - k[:32]).norm() / k[:32].norm()).item()
    per_token = _round_trip(k[:32], "int4", LAYOUT, is_key=True)
    assert error < 0.5 * ((per_token - k[:32]).norm() / k[:32].norm()).item()


def test_monitor_ranks_int4k_between_int8_and_int4():
    monitor = KVErrorMonitor(("bf16", "int8", "int4k", "int4"), rate=1.0)
    q, k, v = _prompt(64)
    monitor.measure(q, k, v, 64**-0.5, LAYOUT)
    errors = {name: monitor.error(name) for name in ("int8", "int4k", "int4")}
    assert errors["int8"] < errors["int4k"] < errors["int4"], errors
