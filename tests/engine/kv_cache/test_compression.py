"""The engine's side of KV compression with the hot window (cache.kv_hot_window = N): the block pool
build_block_pool gives takes new blocks in bf16 at every write format, counts only bf16 room as room
for new tokens, and requantize_cold_blocks moves all but each sequence's newest N blocks into the
write format, full settled blocks only; without the window new blocks follow the write format.

Same layout as test_chunk_pool.py: a chunk holds 16 bf16, 31 int8, 48 int4k or 56 int4 blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from adaptserve.config import CacheConfig
from adaptserve.engine.kv_cache import KVCacheManager
from adaptserve.engine.kv_cache.compression import build_block_pool, requantize_cold_blocks
from adaptserve.engine.kv_cache.formats import KV_FORMATS
from adaptserve.runner.kv_compression import KVGeometry
from tests.engine.kv_cache.test_chunk_pool import BLOCK_SIZE, BLOCKS_PER_CHUNK, CHUNK_BYTES, LAYOUT
from tests.engine.kv_cache.test_manager import FakeRequest
from tests.engine.kv_cache.test_requantize import schedule_prefill, tokens


@dataclass
class Request(FakeRequest):
    num_drafts_in_flight: int = 0  # what requantize_cold_blocks reads besides the manager's fields


def make_manager(num_chunks: int = 6, **cache_options) -> tuple[KVCacheManager, CacheConfig]:
    """An adaptive cache's manager; without the window unless asked (kv_hot_window, default 0 here)."""
    cache_options.setdefault("kv_hot_window", 0)
    cache = CacheConfig(
        block_size=BLOCK_SIZE, kv_policy="adaptive", enable_prefix_caching=False, **cache_options
    )
    block_bytes = {fmt.name: fmt.block_bytes for fmt in LAYOUT.formats()}
    geometry = KVGeometry(LAYOUT, num_chunks, CHUNK_BYTES, dict(BLOCKS_PER_CHUNK), block_bytes)
    pool = build_block_pool(cache, SimpleNamespace(compressed_kv=SimpleNamespace(geometry=geometry)))
    return KVCacheManager(pool.num_blocks, BLOCK_SIZE, False, block_pool=pool), cache


def formats(manager: KVCacheManager, request_id: str) -> list[str]:
    pool = manager.block_pool
    return [pool.format_of(block) for block in manager.req_to_blocks[request_id]]


def settle(
    manager: KVCacheManager, cache: CacheConfig, requests: dict[str, Request]
) -> list[tuple[int, int]]:
    """Requantize until nothing more moves (each call is capped by the room to move into)."""
    moves, step = [], requantize_cold_blocks(manager, cache, requests)
    while step:
        moves += step
        step = requantize_cold_blocks(manager, cache, requests)
    return moves


@pytest.mark.parametrize("write_format", KV_FORMATS)
def test_new_blocks_are_bf16_at_every_level_with_the_window_only(write_format):
    hot, _ = make_manager(kv_hot_window=1)
    plain, _ = make_manager()
    for manager in (hot, plain):
        manager.block_pool.write_format = write_format
        schedule_prefill(manager, Request("a", tokens(0, 3 * BLOCK_SIZE + 1)))
    assert formats(hot, "a") == ["bf16"] * 4
    assert hot.block_pool.token_format == "bf16"
    # room for new tokens is bf16 room: 5 chunks (one is kept back for moves) less the 4 blocks taken
    assert hot.num_free_blocks == 5 * BLOCKS_PER_CHUNK["bf16"] - 4
    stand_in = "int8" if write_format == "int4k" else write_format  # int4k's new tokens: int8
    assert formats(plain, "a") == [stand_in] * 4


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("level", ["int8", "int4k", "int4"])
def test_cold_blocks_move_to_the_levels_format_and_the_newest_n_stay_bf16(window, level):
    manager, cache = make_manager(kv_hot_window=window)
    assert cache.num_recent_blocks == window
    request = Request("a", tokens(0, 6 * BLOCK_SIZE + 3))  # 6 full blocks and one partial
    requests = {"a": request}
    schedule_prefill(manager, request)
    assert requantize_cold_blocks(manager, cache, requests) == []  # bf16: nothing is above it
    manager.block_pool.write_format = level
    moves = requantize_cold_blocks(manager, cache, requests)
    assert len(moves) == 7 - window
    assert formats(manager, "a") == [level] * (7 - window) + ["bf16"] * window
    # a block's worth of decoding: the new block is bf16, and the block that left the window moves
    request.output_token_ids.extend(tokens(900, BLOCK_SIZE))
    (new,) = manager.allocate_slots(request, BLOCK_SIZE)
    request.num_computed_tokens += BLOCK_SIZE
    assert manager.block_pool.format_of(new) == "bf16"
    assert len(requantize_cold_blocks(manager, cache, requests)) == 1
    assert formats(manager, "a") == [level] * (8 - window) + ["bf16"] * window


def test_the_window_subsumes_keep_recent_blocks_the_wider_one_wins():
    manager, cache = make_manager(kv_hot_window=1, kv_keep_recent_blocks=3)
    assert cache.num_recent_blocks == 3
    request = Request("a", tokens(0, 6 * BLOCK_SIZE))
    schedule_prefill(manager, request)
    manager.block_pool.write_format = "int8"
    requantize_cold_blocks(manager, cache, {"a": request})
    assert formats(manager, "a") == ["int8"] * 3 + ["bf16"] * 3


def test_only_settled_full_blocks_leave_the_window():
    """Blocks partly held by drafts in flight stay bf16: a rejected draft's tokens are refilled in bf16."""
    manager, cache = make_manager(kv_hot_window=1)
    request = Request("a", tokens(0, 5 * BLOCK_SIZE + 3), num_drafts_in_flight=BLOCK_SIZE + 12)
    schedule_prefill(manager, request)  # settled: 4 * 16 - 9 tokens, 3 full blocks
    manager.block_pool.write_format = "int4"
    requantize_cold_blocks(manager, cache, {"a": request})
    assert formats(manager, "a") == ["int4"] * 3 + ["bf16"] * 3
    request.num_drafts_in_flight = 0  # all accepted
    requantize_cold_blocks(manager, cache, {"a": request})
    assert formats(manager, "a") == ["int4"] * 5 + ["bf16"]  # never the last, partial block


def test_free_room_for_new_tokens_is_the_bf16_room_moves_free():
    """The cache full of bf16 blocks: moves fill the chunk kept back and free as many bf16 slots,
    which the scheduler's count shows and which can all be taken in bf16, and no more. Every bf16
    chunk still holds a sequence's hot blocks, so none comes free and moves wait until one does
    (here: a sequence finishes); then they go on."""
    manager, cache = make_manager(num_chunks=4, kv_hot_window=2)
    pool = manager.block_pool
    requests = {str(i): Request(str(i), tokens(1000 * i, 16 * BLOCK_SIZE)) for i in range(3)}
    for request in requests.values():
        schedule_prefill(manager, request)  # 3 chunks of 16 bf16 blocks; the 4th is the reserve
    assert manager.num_free_blocks == 0
    pool.write_format = "int8"
    moves = settle(manager, cache, requests)
    assert len(moves) == BLOCKS_PER_CHUNK["int8"]  # the chunk kept back, full
    assert pool.chunk_format == ["bf16", "bf16", "bf16", "int8"] and pool.num_free_blocks_for_moves == 0
    assert manager.num_free_blocks == len(moves)
    taken = pool.get_new_blocks(len(moves))
    assert {pool.format_of(block) for block in taken} == {"bf16"}
    with pytest.raises(ValueError, match="only 0 are free"):
        pool.get_new_blocks(1)
    pool.free_blocks(taken)
    manager.free(requests.pop("0"))  # its int8 blocks and its chunk's hot blocks are freed
    more = settle(manager, cache, requests)
    assert len(more) == 2 * 14 - (len(moves) - 14)  # the rest of the cold blocks of "1" and "2"
    for request_id in requests:
        assert formats(manager, request_id) == ["int8"] * 14 + ["bf16"] * 2
