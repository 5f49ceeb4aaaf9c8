"""KVCacheManager over a ChunkedBlockPool requantizing cold blocks into the write format, and the
runner applying the moves. With int4k (a whole-block format) as the write format, new blocks are int8
and only requantization moves reach int4k. Layout and block ids as in test_chunk_pool.py.
"""

from __future__ import annotations

import pytest
import torch

from adaptserve.engine.kv_cache import KVCacheBlock, KVCacheManager
from adaptserve.runner.kv_compression import CompressedKVCache, KVGeometry
from tests.engine.kv_cache.test_chunk_pool import (
    BLOCK_SIZE,
    CHUNK_BYTES,
    LAYOUT,
    MAX_BLOCKS,
    chunk_of,
    ids,
    make_pool,
)
from tests.engine.kv_cache.test_manager import FakeRequest

# ---------------------------------------------------------------------------------------------------
# KVCacheManager over a ChunkedBlockPool


def make_manager(num_chunks: int = 4) -> KVCacheManager:
    pool = make_pool(num_chunks)
    return KVCacheManager(pool.num_blocks, BLOCK_SIZE, block_pool=pool)


def schedule_prefill(manager: KVCacheManager, request: FakeRequest) -> list[KVCacheBlock]:
    """Look up hits, allocate, advance (what a scheduler does for a waiting request)."""
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(request)
    num_new_tokens = request.num_tokens - num_hit_tokens
    new_blocks = manager.allocate_slots(request, num_new_tokens, hit_blocks)
    assert new_blocks is not None
    request.num_computed_tokens += num_hit_tokens + num_new_tokens
    return new_blocks


def tokens(start: int, num: int) -> list[int]:
    return list(range(start, start + num))


def test_manager_allocates_in_the_write_format():
    manager = make_manager()
    pool = manager.block_pool
    assert manager.num_blocks == 4 * MAX_BLOCKS and manager.num_free_blocks == 4 * 16
    schedule_prefill(manager, FakeRequest("a", tokens(0, 40)))  # 3 blocks
    pool.write_format = "int4"
    schedule_prefill(manager, FakeRequest("b", tokens(1000, 40)))
    assert manager.get_block_ids("a") == [0, 1, 2]
    assert manager.get_block_ids("b") == [MAX_BLOCKS, MAX_BLOCKS + 1, MAX_BLOCKS + 2]
    assert pool.drain_chunk_format_changes() == [(0, "bf16"), (1, "int4")]
    # a hit on an idle chunk of another format costs that whole chunk
    manager.free(FakeRequest("a", []))
    hit_blocks, _ = manager.get_computed_blocks(FakeRequest("c", tokens(0, 40)))
    assert ids(hit_blocks) == [0, 1]
    assert pool.free_capacity_after(hit_blocks) == manager.num_free_blocks - 56


def test_requantize_cold_moves_only_cold_unshared_blocks():
    manager = make_manager()
    pool = manager.block_pool
    a = FakeRequest("a", tokens(0, 5 * BLOCK_SIZE + 3))  # 5 full blocks and one partial
    b = FakeRequest("b", tokens(0, 2 * BLOCK_SIZE) + tokens(500, 20))  # a's first 2 blocks, 2 own
    schedule_prefill(manager, a)
    schedule_prefill(manager, b)
    a_before, b_before = manager.get_block_ids("a"), manager.get_block_ids("b")
    assert a_before == [0, 1, 2, 3, 4, 5] and b_before == [0, 1, 6, 7]
    hashes = [pool.blocks[i].block_hash for i in a_before]
    assert None not in hashes[:5]
    pool.drain_chunk_format_changes()

    assert manager.requantize_cold(max_blocks=100, keep_recent_blocks=1) == []  # bf16 is the top
    pool.write_format = "int4"
    moves = manager.requantize_cold(max_blocks=100, keep_recent_blocks=1)
    # shared blocks 0, 1 (ref_cnt 2) and each request's last block (5, 7) stay
    assert [src for src, _ in moves] == [2, 3, 4, 6]
    assert [dst for _, dst in moves] == [MAX_BLOCKS + i for i in range(4)]
    assert pool.drain_chunk_format_changes() == [(1, "int4")]
    assert all(pool.chunk_format[chunk_of(dst)] == "int4" for _, dst in moves)
    assert manager.get_block_ids("a") == [0, 1, MAX_BLOCKS, MAX_BLOCKS + 1, MAX_BLOCKS + 2, 5]
    assert manager.get_block_ids("b") == [0, 1, MAX_BLOCKS + 3, 7]
    for src, dst in moves:
        assert pool.blocks[src].ref_cnt == 0 and pool.blocks[src].block_hash is None
        assert pool.blocks[dst].ref_cnt == 1
    for i, block_hash in enumerate(hashes[:5]):  # the prefix cache follows the moved blocks
        assert pool.get_cached_block(block_hash).block_id == manager.get_block_ids("a")[i]
    assert pool.usage_by_format() == {"bf16": 4, "fp8": 0, "int8": 0, "int4k": 0, "int4": 4}

    # a new request still hits all of a's full blocks, bf16 and int4 alike
    c = FakeRequest("c", tokens(0, 5 * BLOCK_SIZE + 1))
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(c)
    assert num_hit_tokens == 5 * BLOCK_SIZE
    assert ids(hit_blocks) == manager.get_block_ids("a")[:5]
    assert manager.requantize_cold(max_blocks=100, keep_recent_blocks=1) == []  # nothing cold left


def test_requantize_cold_respects_max_blocks_and_the_format_order():
    manager = make_manager()
    pool = manager.block_pool
    schedule_prefill(manager, FakeRequest("a", tokens(0, 6 * BLOCK_SIZE)))  # 6 blocks, 5 cold
    pool.write_format = "int8"
    first = manager.requantize_cold(max_blocks=2, keep_recent_blocks=1)
    assert [src for src, _ in first] == [0, 1]
    assert manager.requantize_cold(max_blocks=0, keep_recent_blocks=1) == []
    second = manager.requantize_cold(max_blocks=100, keep_recent_blocks=1)
    assert [src for src, _ in second] == [2, 3, 4]
    pool.write_format = "int4"  # int8 blocks are above int4: they move again
    third = manager.requantize_cold(max_blocks=100, keep_recent_blocks=1)
    assert sorted(src for src, _ in third) == sorted(dst for _, dst in first + second)
    pool.write_format = "fp8"  # only the bf16 block is above fp8: int4 blocks never move up
    ((src, dst),) = manager.requantize_cold(max_blocks=100, keep_recent_blocks=0)
    assert src == 5 and pool.chunk_format[chunk_of(dst)] == "fp8"
    assert [pool.format_of(b) for b in manager.req_to_blocks["a"]] == ["int4"] * 5 + ["fp8"]


def test_requantizing_a_whole_chunk_frees_it():
    manager = make_manager()
    pool = manager.block_pool
    request = FakeRequest("a", tokens(0, 16 * BLOCK_SIZE + 5))  # chunk 0 full, one block of chunk 1
    schedule_prefill(manager, request)
    pool.write_format = "int4"
    capacity_before = manager.num_free_blocks
    assert capacity_before == 2 * 56
    moves = manager.requantize_cold(max_blocks=100, keep_recent_blocks=1)
    assert [src for src, _ in moves] == list(range(16))  # all of chunk 0, not the recent block
    assert pool.chunk_format[0] is None and 0 in pool.free_chunks
    assert pool.drain_chunk_format_changes()[-1:] == [(2, "int4")]
    assert manager.num_free_blocks == (56 - 16) + 2 * 56 > capacity_before
    assert pool.usage < 16 * LAYOUT.format("bf16").block_bytes / (4 * CHUNK_BYTES)


def test_requantized_kv_survives_the_runner_applying_the_moves():
    """End to end with the runner's arena: write bf16 KV, requantize every block to int4, apply the
    step's chunk hand-overs and moves as the runner does, read the moved blocks back. The batch is
    big enough that a chunk emptied by its first moves is handed to int4 for its last ones."""
    manager = make_manager(num_chunks=6)
    pool = manager.block_pool
    geometry = KVGeometry(LAYOUT, 6, CHUNK_BYTES, dict(pool.blocks_per_chunk), dict(pool.block_bytes))
    cache = CompressedKVCache(geometry, num_layers=1, device=torch.device("cpu"))
    arena = cache.arenas[0]
    requests = [FakeRequest(str(i), tokens(1000 * i, 16 * BLOCK_SIZE)) for i in range(4)]
    for request in requests:
        schedule_prefill(manager, request)
    cache.apply(pool.drain_chunk_format_changes(), [])
    g = torch.Generator().manual_seed(0)
    block_ids = torch.tensor([i for r in requests for i in manager.get_block_ids(r.request_id)])  # [64]
    shape = (len(block_ids) * BLOCK_SIZE, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)  # [64 * bs, H, D]
    slots = (block_ids[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()
    arena.write(slots, k, v)

    pool.write_format = "int4"
    moves = manager.requantize_cold(max_blocks=64, keep_recent_blocks=0)
    assert len(moves) == 64
    changes = pool.drain_chunk_format_changes()
    assert {chunk for chunk, _ in changes} & {chunk_of(src) for src, _ in moves}  # the hard case
    cache.apply(changes, moves)
    new_ids = torch.tensor([i for r in requests for i in manager.get_block_ids(r.request_id)])
    assert all(pool.chunk_format[chunk_of(i)] == "int4" for i in new_ids.tolist())
    out_k, out_v = arena.read_blocks(new_ids, torch.float32)  # [64, bs, H, D]
    for out, expected in ((out_k, k), (out_v, v)):
        error = (out.flatten(0, 1) - expected).norm() / expected.norm()
        assert error < 0.12


@pytest.mark.parametrize("move_elements", [1 << 24, 1], ids=["one-pass", "a-layer-a-pass"])
def test_moves_run_over_every_layer_at_once_with_each_layers_own_bytes(monkeypatch, move_elements):
    """Three layers, each with its own K/V: the moves run once over all layers (all_layers) and leave
    every layer's bytes exactly as moving it alone (read, hand over, requantize) would, int4k keys
    included; the other layers' blocks stay apart. Also with the requantization split into passes."""
    monkeypatch.setattr("adaptserve.runner.kv_compression.MOVE_ELEMENTS", move_elements)
    manager = make_manager(num_chunks=6)
    pool = manager.block_pool
    geometry = KVGeometry(LAYOUT, 6, CHUNK_BYTES, dict(pool.blocks_per_chunk), dict(pool.block_bytes))
    cache = CompressedKVCache(geometry, num_layers=3, device=torch.device("cpu"))
    alone = CompressedKVCache(geometry, num_layers=3, device=torch.device("cpu"))
    request = FakeRequest("a", tokens(0, 20 * BLOCK_SIZE + 5))
    schedule_prefill(manager, request)
    changes = pool.drain_chunk_format_changes()
    cache.apply(changes, [])
    alone.apply(changes, [])
    g = torch.Generator().manual_seed(0)
    block_ids = torch.tensor(manager.get_block_ids("a"))  # [21]
    shape = (len(block_ids), BLOCK_SIZE, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    layer_kv = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(3)]
    for target in (cache, alone):
        for arena, (k, v) in zip(target.arenas, layer_kv, strict=True):
            arena.write_blocks(block_ids, k, v)

    pool.write_format = "int4k"
    moves = manager.requantize_cold(64, 1, settled_tokens={"a": request.num_computed_tokens})
    changes = pool.drain_chunk_format_changes()
    cache.apply(changes, moves)
    src, dst = (torch.tensor(ids) for ids in zip(*moves, strict=True))
    moved = [arena.read_blocks(src, LAYOUT.native_dtype) for arena in alone.arenas]
    alone.apply(changes, [])  # the hand-overs alone, then each layer's copies
    for arena, (k, v) in zip(alone.arenas, moved, strict=True):
        arena.write_blocks(dst, k, v)
    for layer, (arena, reference) in enumerate(zip(cache.arenas, alone.arenas, strict=True)):
        assert torch.equal(arena.bytes, reference.bytes), f"layer {layer}'s bytes differ"
        out_k, _ = arena.read_blocks(dst, torch.float32)  # [20, bs, H, D]
        k = layer_kv[layer][0][[block_ids.tolist().index(s) for s in src.tolist()]]  # the moved blocks'
        error = ((out_k - k).norm() / k.norm()).item()
        assert error < 0.08, error  # its own keys (0.065; another layer's are 1.4 away)
    assert cache.num_requantized_blocks == len(moves) == 20


# ---------------------------------------------------------------------------------------------------
# int4k: a whole-block format, reached only by requantization


def test_int4k_write_format_takes_new_blocks_in_int8():
    pool = make_pool(write_format="int4k")
    assert pool.write_format == "int4k" and pool.token_format == "int8"
    assert pool.num_free_blocks == 4 * 31
    new = pool.get_new_blocks(40)  # a chunk and a half of int8 blocks
    assert {pool.format_of(b) for b in new} == {"int8"}
    (moved,) = pool.get_new_blocks(1, for_move=True)  # a requantization copy: int4k
    assert pool.format_of(moved) == "int4k"
    assert pool.drain_chunk_format_changes() == [(0, "int8"), (1, "int8"), (2, "int4k")]
    assert pool.num_free_blocks == (2 * 31 - 40) + 31  # the rest of chunk 1, and chunk 3 as int8 ...
    assert pool.num_free_blocks_for_moves == 47 + 48  # ... or the rest of chunk 2, and chunk 3 as int4k


def test_requantize_into_int4k_moves_only_settled_full_blocks():
    manager = make_manager()
    pool = manager.block_pool
    a = FakeRequest("a", tokens(0, 5 * BLOCK_SIZE + 3))  # 5 full blocks and one partial
    schedule_prefill(manager, a)
    pool.write_format = "int4k"
    with pytest.raises(ValueError, match="needs settled_tokens"):
        manager.requantize_cold(max_blocks=100, keep_recent_blocks=1)
    # drafts in flight cover the last 2 full blocks' tail: a rejection could refill them a token at a time
    moves = manager.requantize_cold(100, 1, settled_tokens={"a": 3 * BLOCK_SIZE + 7})
    assert [src for src, _ in moves] == [0, 1, 2]
    assert {pool.format_of(pool.blocks[dst]) for _, dst in moves} == {"int4k"}
    moves = manager.requantize_cold(100, 1, settled_tokens={"a": a.num_computed_tokens})
    assert [src for src, _ in moves] == [3, 4]  # never the last, partial block
    assert [pool.format_of(b) for b in manager.req_to_blocks["a"]] == ["int4k"] * 5 + ["bf16"]
    b = FakeRequest("b", tokens(900, 20))
    schedule_prefill(manager, b)  # new tokens: int8 while the write format is int4k
    assert [pool.format_of(block) for block in manager.req_to_blocks["b"]] == ["int8", "int8"]
    pool.write_format = "int4"  # int4k is above int4: its blocks move again, a token at a time
    moves = manager.requantize_cold(100, 1)
    assert len(moves) == 6 and {pool.format_of(pool.blocks[d]) for _, d in moves} == {"int4"}


def test_int4k_moves_survive_the_runner_and_new_tokens_never_land_in_int4k():
    """Write bf16 KV, requantize every full block into int4k as the engine does, apply the moves as the
    runner does and read them back; the partial last block keeps taking tokens, in int8 once the
    write format is int4k, and a token write into an int4k block is refused."""
    manager = make_manager(num_chunks=6)
    pool = manager.block_pool
    geometry = KVGeometry(LAYOUT, 6, CHUNK_BYTES, dict(pool.blocks_per_chunk), dict(pool.block_bytes))
    cache = CompressedKVCache(geometry, num_layers=1, device=torch.device("cpu"))
    arena = cache.arenas[0]
    request = FakeRequest("a", tokens(0, 20 * BLOCK_SIZE + 5))  # 20 full blocks, one partial
    schedule_prefill(manager, request)
    cache.apply(pool.drain_chunk_format_changes(), [])
    g = torch.Generator().manual_seed(0)
    block_ids = torch.tensor(manager.get_block_ids("a"))  # [21]
    shape = (len(block_ids), BLOCK_SIZE, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)  # [21, bs, H, D]
    k[..., 7] *= 10.0  # an outlier key channel
    arena.write_blocks(block_ids, k, v)

    pool.write_format = "int4k"
    moves = manager.requantize_cold(64, 1, settled_tokens={"a": request.num_computed_tokens})
    assert len(moves) == 20
    cache.apply(pool.drain_chunk_format_changes(), moves)
    new_ids = torch.tensor(manager.get_block_ids("a"))
    assert [pool.format_of(pool.blocks[i]) for i in new_ids.tolist()] == ["int4k"] * 20 + ["bf16"]
    out_k, out_v = arena.read_blocks(new_ids[:20], torch.float32)  # [20, bs, H, D]
    assert ((out_k - k[:20]).norm() / k[:20].norm()) < 0.07
    assert ((out_v - v[:20]).norm() / v[:20].norm()) < 0.12

    request.output_token_ids.extend(tokens(5000, BLOCK_SIZE))  # a block's worth of decoding
    assert manager.allocate_slots(request, BLOCK_SIZE) is not None
    (tail,) = manager.req_to_blocks["a"][21:]
    assert pool.format_of(tail) == "int8"
    cache.apply(pool.drain_chunk_format_changes(), [])
    slots = torch.arange(20 * BLOCK_SIZE + 5, 21 * BLOCK_SIZE + 5)
    slots = torch.tensor(manager.get_block_ids("a"))[slots // BLOCK_SIZE] * BLOCK_SIZE + slots % BLOCK_SIZE
    arena.write(slots, k[0], v[0])  # the bf16 tail and the new int8 block take tokens
    with pytest.raises(ValueError, match="cannot write single tokens into int4k"):
        arena.write(new_ids[:1] * BLOCK_SIZE, k[0, :1], v[0, :1])
