"""ChunkedBlockPool: chunks handed to formats on demand, capacity in the write format, idle chunks
kept for their prefixes and reclaimed, usage by bytes, invariants under random load. (The
KVCacheManager on top of it requantizing cold blocks: test_requantize.py.)

The layout (16 tokens, 3 KV heads, head_dim 64, bf16) cuts a chunk of 16 bf16 blocks into 31 fp8 or
int8 blocks, 48 int4k blocks or 56 int4 blocks; block ids are chunk * 56 + index.
"""

from __future__ import annotations

import random

import pytest
import torch

from adaptserve.engine.kv_cache import KVCacheBlock
from adaptserve.engine.kv_cache.chunk_pool import ChunkedBlockPool
from adaptserve.engine.kv_cache.formats import KV_FORMATS, KVLayout, token_format

LAYOUT = KVLayout(block_size=16, num_kv_heads=3, head_dim=64, native_dtype=torch.bfloat16)
BLOCK_SIZE = LAYOUT.block_size
CHUNK_BYTES = 16 * LAYOUT.format("bf16").block_bytes
BLOCKS_PER_CHUNK = {"bf16": 16, "fp8": 31, "int8": 31, "int4k": 48, "int4": 56}
MAX_BLOCKS = 56


def make_pool(num_chunks: int = 4, write_format: str = "bf16", enable_prefix_caching: bool = True):
    formats = LAYOUT.formats()
    return ChunkedBlockPool(
        num_chunks,
        {fmt.name: CHUNK_BYTES // fmt.block_bytes for fmt in formats},
        {fmt.name: fmt.block_bytes for fmt in formats},
        write_format,
        enable_prefix_caching,
    )


def ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [block.block_id for block in blocks]


def chunk_of(block_id: int) -> int:
    return block_id // MAX_BLOCKS


def free_ids(pool: ChunkedBlockPool, name: str) -> list[int]:
    return [block.block_id for block in pool.queues[name]]


def test_blocks_per_chunk_follow_the_layout():
    pool = make_pool()
    assert pool.blocks_per_chunk == BLOCKS_PER_CHUNK
    assert pool.max_blocks_per_chunk == MAX_BLOCKS
    assert pool.num_blocks == 4 * MAX_BLOCKS  # the id space; not all usable at once
    assert pool.chunk_format == [None] * 4
    assert pool.drain_chunk_format_changes() == []


def test_allocation_takes_chunks_on_demand_and_records_them():
    pool = make_pool()
    assert pool.num_free_blocks == 4 * 16
    first = pool.get_new_blocks(3)
    assert ids(first) == [0, 1, 2]
    assert all(block.ref_cnt == 1 and block.block_hash is None for block in first)
    assert pool.chunk_format == ["bf16", None, None, None]
    assert pool.drain_chunk_format_changes() == [(0, "bf16")]
    assert pool.drain_chunk_format_changes() == []  # drained once

    second = pool.get_new_blocks(14)  # 13 left in chunk 0, then chunk 1
    assert ids(second) == [*range(3, 16), MAX_BLOCKS]
    assert pool.drain_chunk_format_changes() == [(1, "bf16")]
    assert pool.num_free_blocks == 4 * 16 - 17

    pool.write_format = "int8"  # chunks 0 and 1 are bf16 now: two free chunks of 31 int8 blocks
    assert pool.num_free_blocks == 2 * 31
    assert ids(pool.get_new_blocks(1)) == [2 * MAX_BLOCKS]
    assert pool.drain_chunk_format_changes() == [(2, "int8")]
    assert pool.num_free_blocks == 30 + 31
    assert pool.usage_by_format() == {"bf16": 17, "fp8": 0, "int8": 1, "int4k": 0, "int4": 0}

    pool.write_format = "bf16"  # the rest of chunk 1 and chunk 3
    assert pool.num_free_blocks == 15 + 16
    with pytest.raises(ValueError, match="only 31 are free"):
        pool.get_new_blocks(32)
    assert pool.drain_chunk_format_changes() == []  # a refused allocation takes no chunk


def test_capacity_in_each_write_format_on_empty_memory():
    pool = make_pool()
    capacity = {}
    for name in KV_FORMATS:
        pool.write_format = name
        capacity[name] = pool.num_free_blocks
    assert capacity == {name: 4 * BLOCKS_PER_CHUNK[token_format(name)] for name in KV_FORMATS}
    assert capacity["int4k"] == capacity["int8"]  # new int4k-era blocks are int8
    assert capacity["int4"] / capacity["bf16"] == pytest.approx(3.5)
    assert len(pool.get_new_blocks(capacity["int4"])) == 4 * 56  # all of it can really be taken
    assert pool.num_free_blocks == 0
    with pytest.raises(ValueError, match="unknown KV format"):
        pool.write_format = "int2"
    with pytest.raises(ValueError, match="unknown KV format"):
        make_pool(write_format="fp16")


def test_freeing_every_block_of_an_uncached_chunk_frees_the_chunk():
    pool = make_pool()
    blocks = pool.get_new_blocks(20)  # chunk 0 full, 4 blocks of chunk 1
    pool.drain_chunk_format_changes()
    pool.free_blocks(blocks[:15])
    assert pool.chunk_format[0] == "bf16"  # one block still referenced
    pool.free_blocks(blocks[15:16])
    assert pool.chunk_format == [None, "bf16", None, None]
    assert 0 in pool.free_chunks and not pool.idle_chunks["bf16"]
    assert free_ids(pool, "bf16") == [MAX_BLOCKS + i for i in range(4, 16)]  # chunk 0 left the queue
    pool.write_format = "int4"
    assert pool.num_free_blocks == 3 * 56
    assert ids(pool.get_new_blocks(1)) == [0]  # the freed chunk, now int4
    assert pool.drain_chunk_format_changes() == [(0, "int4")]


def test_uncached_blocks_are_reused_first_cached_ones_last():
    pool = make_pool(num_chunks=1)
    blocks = pool.get_new_blocks(4)
    pool.cache_block(blocks[1], 101)
    pool.free_blocks([blocks[3]])  # uncached: to the front (LIFO)
    pool.free_blocks([blocks[1]])  # cached: to the back (LRU)
    assert free_ids(pool, "bf16")[0] == 3 and free_ids(pool, "bf16")[-1] == 1
    assert ids(pool.get_new_blocks(1)) == [3]


def test_idle_chunk_keeps_its_prefixes_until_another_format_needs_it():
    pool = make_pool(num_chunks=2)
    blocks = pool.get_new_blocks(16)  # all of chunk 0
    assert pool.drain_chunk_format_changes() == [(0, "bf16")]
    assert pool.cache_block(blocks[0], 100) and pool.cache_block(blocks[1], 101)
    pool.free_blocks(reversed(blocks))
    assert pool.chunk_format == ["bf16", None]  # idle, not freed: it holds cached prefixes
    assert pool.idle_chunks["bf16"] == {0}
    assert pool.get_cached_block(100) is blocks[0] and pool.num_cached_blocks == 2
    assert pool.num_free_blocks == 2 * 16
    pool.write_format = "int4"
    assert pool.num_free_blocks == 2 * 56  # an idle chunk of another format counts as free

    # a prefix hit on the idle chunk makes it busy: it can no longer be handed to int4
    assert pool.free_capacity_after([blocks[0], blocks[1]]) == 56
    pool.touch([blocks[0], blocks[1]])
    assert blocks[0].ref_cnt == 1 and pool.num_free_blocks == 56 and not pool.idle_chunks["bf16"]
    pool.free_blocks([blocks[1], blocks[0]])
    assert pool.idle_chunks["bf16"] == {0}

    taken = pool.get_new_blocks(56)  # chunk 1 first: the free chunk, not the idle one
    assert {chunk_of(i) for i in ids(taken)} == {1}
    assert pool.get_cached_block(100) is blocks[0]
    assert pool.drain_chunk_format_changes() == [(1, "int4")]

    (reclaimed,) = pool.get_new_blocks(1)  # now chunk 0 is handed to int4: its prefixes go
    assert reclaimed.block_id == 0
    assert pool.drain_chunk_format_changes() == [(0, "int4")]
    assert pool.chunk_format == ["int4", "int4"]
    assert pool.get_cached_block(100) is None and pool.get_cached_block(101) is None
    assert pool.num_cached_blocks == 0 and blocks[1].block_hash is None
    assert free_ids(pool, "bf16") == []


def test_idle_chunk_of_the_write_format_is_reused_in_place():
    pool = make_pool(num_chunks=1)
    blocks = pool.get_new_blocks(16)
    pool.cache_block(blocks[5], 105)
    pool.free_blocks(blocks)
    assert pool.free_capacity_after([blocks[5]]) == 15  # the hit leaves the bf16 queue
    new_blocks = pool.get_new_blocks(15)  # uncached blocks first: the prefix survives
    assert blocks[5] not in new_blocks and pool.get_cached_block(105) is blocks[5]
    assert pool.drain_chunk_format_changes() == [(0, "bf16")]  # taken once, at the start


def test_usage_is_by_bytes():
    pool = make_pool()
    bf16_bytes, int4_bytes = LAYOUT.format("bf16").block_bytes, LAYOUT.format("int4").block_bytes
    assert pool.usage == 0.0
    bf16_blocks = pool.get_new_blocks(8)
    assert pool.usage == pytest.approx(8 * bf16_bytes / (4 * CHUNK_BYTES))  # 1/8
    pool.write_format = "int4"
    int4_blocks = pool.get_new_blocks(56)
    assert pool.usage == pytest.approx((8 * bf16_bytes + 56 * int4_bytes) / (4 * CHUNK_BYTES))
    pool.free_blocks(bf16_blocks)
    assert pool.usage == pytest.approx(56 * int4_bytes / (4 * CHUNK_BYTES))  # a full chunk, about 1/4
    pool.free_blocks(int4_blocks)
    assert pool.usage == 0.0


def test_move_hash_hands_the_prefix_to_the_copy():
    pool = make_pool()
    src = pool.get_new_blocks(1)[0]
    pool.cache_block(src, 7)
    pool.write_format = "int4"
    dst = pool.get_new_blocks(1)[0]
    pool.move_hash(src, dst)
    assert dst.block_hash == 7 and src.block_hash is None
    assert pool.get_cached_block(7) is dst and pool.num_cached_blocks == 1
    pool.free_blocks([src])
    assert pool.chunk_format[0] is None  # src's chunk held no other prefix: freed
    assert pool.get_cached_block(7) is dst


def test_reset_prefix_cache_frees_idle_chunks():
    pool = make_pool()
    blocks = pool.get_new_blocks(2)
    pool.cache_block(blocks[0], 1)
    assert not pool.reset_prefix_cache()  # blocks are referenced
    pool.free_blocks(blocks)
    assert pool.chunk_format[0] == "bf16"
    assert pool.reset_prefix_cache()
    assert pool.chunk_format == [None] * 4 and pool.num_cached_blocks == 0
    assert sorted(pool.free_chunks) == [0, 1, 2, 3]


def test_double_free_raises():
    pool = make_pool()
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block])


# ---------------------------------------------------------------------------------------------------
# invariants under random load


def check_invariants(pool: ChunkedBlockPool, holders: list[list[KVCacheBlock]]) -> None:
    """Every block is referenced or in exactly one queue, of its chunk's format; the counts the pool
    keeps match a recount; num_free_blocks matches a recount by chunks."""
    in_queue: dict[int, str] = {}
    for name, queue in pool.queues.items():
        for block in queue:
            assert block.block_id not in in_queue, f"block {block.block_id} queued twice"
            in_queue[block.block_id] = name
        assert len(queue) == sum(1 for _ in queue)

    expected_refs = [0] * pool.num_blocks
    for blocks in holders:
        for block in blocks:
            expected_refs[block.block_id] += 1
    assert [block.ref_cnt for block in pool.blocks] == expected_refs

    referenced_by_format = dict.fromkeys(KV_FORMATS, 0)
    free_in_write_format = 0
    spare_chunks = 0  # chunks no block of which is referenced, in another format than the write format
    assert len(set(pool.free_chunks)) == len(pool.free_chunks)
    for chunk, name in enumerate(pool.chunk_format):
        blocks = pool.blocks[chunk * MAX_BLOCKS : (chunk + 1) * MAX_BLOCKS]
        if name is None:
            assert chunk in pool.free_chunks
            assert all(b.ref_cnt == 0 and b.block_hash is None and b.block_id not in in_queue for b in blocks)
            spare_chunks += pool.token_format != name
            continue
        assert chunk not in pool.free_chunks
        usable, beyond = blocks[: BLOCKS_PER_CHUNK[name]], blocks[BLOCKS_PER_CHUNK[name] :]
        assert all(b.ref_cnt == 0 and b.block_hash is None and b.block_id not in in_queue for b in beyond)
        for block in usable:
            assert (block.ref_cnt > 0) != (block.block_id in in_queue)
            assert block.ref_cnt > 0 or in_queue[block.block_id] == name
        referenced = sum(1 for b in usable if b.ref_cnt > 0)
        assert pool.chunk_referenced[chunk] == referenced
        referenced_by_format[name] += referenced
        idle = referenced == 0
        assert (chunk in pool.idle_chunks[name]) == idle
        if idle:  # an idle chunk is kept only for its prefixes
            assert any(b.block_hash is not None for b in usable)
            spare_chunks += name != pool.token_format
        if name == pool.token_format:
            free_in_write_format += BLOCKS_PER_CHUNK[name] - referenced
    assert pool.referenced_blocks == referenced_by_format
    for name, chunks in pool.idle_chunks.items():
        assert all(pool.chunk_format[c] == name for c in chunks)
    expected_free = free_in_write_format + spare_chunks * BLOCKS_PER_CHUNK[pool.token_format]
    assert pool.num_free_blocks == expected_free

    hashed = {b.block_hash: b for b in pool.blocks if b.block_hash is not None}
    assert pool.cached_blocks == hashed
    held = sum(n * pool.block_bytes[name] for name, n in referenced_by_format.items())
    assert pool.usage == pytest.approx(held / (pool.num_chunks * CHUNK_BYTES))


class RandomLoad:
    """Random allocations, frees, prefix hits and format switches on one pool."""

    def __init__(self, seed: int, num_chunks: int = 5):
        self.rng = random.Random(seed)
        self.pool = make_pool(num_chunks)
        self.holders: list[list[KVCacheBlock]] = []
        self.next_hash = 0
        self.num_hits = 0
        self.num_full_allocations = 0
        self.num_refused = 0
        self.num_reclaims = 0

    def allocate(self) -> None:
        pool = self.pool
        num_blocks = self.rng.randint(1, 30)
        if num_blocks > pool.num_free_blocks:
            with pytest.raises(ValueError):
                pool.get_new_blocks(num_blocks)
            self.num_refused += 1
            return
        name = pool.token_format
        idle_elsewhere = {c for n, chunks in pool.idle_chunks.items() if n != name for c in chunks}
        blocks = pool.get_new_blocks(num_blocks)
        assert all(b.ref_cnt == 1 and b.block_hash is None for b in blocks)
        assert all(pool.format_of(b) == name for b in blocks)
        for chunk in idle_elsewhere:  # an idle chunk handed to the write format lost its prefixes
            if pool.chunk_format[chunk] == name:
                self.num_reclaims += 1
                chunk_blocks = pool.blocks[chunk * MAX_BLOCKS : (chunk + 1) * MAX_BLOCKS]
                assert all(b.block_hash is None for b in chunk_blocks)
        for block in blocks:
            if self.rng.random() < 0.5:
                assert pool.cache_block(block, self.next_hash)
                self.next_hash += 1
        self.holders.append(blocks)

    def free(self) -> None:
        if self.holders:
            blocks = self.holders.pop(self.rng.randrange(len(self.holders)))
            self.pool.free_blocks(reversed(blocks))

    def hit(self) -> None:
        """Prefix hits on cached blocks: touching them costs exactly what free_capacity_after said."""
        pool = self.pool
        cached = list(pool.cached_blocks.values())
        if not cached:
            return
        hits = self.rng.sample(cached, self.rng.randint(1, min(6, len(cached))))
        expected = pool.free_capacity_after(hits)
        pool.touch(hits)
        self.num_hits += 1
        assert pool.num_free_blocks == expected
        self.holders.append(hits)
        if self.rng.random() < 0.2:  # and all of it can really be taken
            taken = pool.get_new_blocks(expected)
            assert pool.num_free_blocks == 0
            self.holders.append(taken)
            self.num_full_allocations += 1

    def switch_format(self) -> None:
        self.pool.write_format = self.rng.choice(KV_FORMATS)

    def step(self) -> None:
        op = self.rng.random()
        if op < 0.35:
            self.allocate()
        elif op < 0.7:
            self.free()
        elif op < 0.85:
            self.hit()
        else:
            self.switch_format()
        check_invariants(self.pool, self.holders)


@pytest.mark.parametrize("seed", range(4))
def test_invariants_under_random_load(seed):
    load = RandomLoad(seed)
    for _ in range(300):
        load.step()
        assert "int4k" not in load.pool.chunk_format  # new blocks never are int4k, whatever the format
    assert load.num_hits > 10 and load.num_full_allocations > 0 and load.num_refused > 0
    assert load.num_reclaims > 0
    # everything freed: every chunk is free again or idle for its prefixes, and all of it is usable
    while load.holders:
        load.free()
    check_invariants(load.pool, load.holders)
    for name in KV_FORMATS:
        load.pool.write_format = name
        assert load.pool.num_free_blocks == 5 * BLOCKS_PER_CHUNK[token_format(name)]
    assert load.pool.reset_prefix_cache()
    assert sorted(load.pool.free_chunks) == list(range(5))
