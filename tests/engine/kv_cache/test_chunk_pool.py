"""ChunkedBlockPool: chunks handed to formats on demand, capacity in the write format, idle chunks
kept for their prefixes and reclaimed, usage by bytes, invariants under random load; and the
KVCacheManager on top of it requantizing cold blocks into the write format. With int4k (a whole-block
format) as the write format, new blocks are int8 and only requantization moves reach int4k.

The layout (16 tokens, 3 KV heads, head_dim 64, bf16) cuts a chunk of 16 bf16 blocks into 31 fp8 or
int8 blocks, 48 int4k blocks or 56 int4 blocks; block ids are chunk * 56 + index.
"""

from __future__ import annotations

import random

import pytest
import torch

from adaptserve.engine.kv_cache import KVCacheBlock, KVCacheManager
from adaptserve.engine.kv_cache.chunk_pool import ChunkedBlockPool
from adaptserve.engine.kv_cache.formats import KV_FORMATS, KVLayout, token_format
from adaptserve.runner.kv_compression import CompressedKVCache, KVGeometry
from tests.engine.kv_cache.test_manager import FakeRequest

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
