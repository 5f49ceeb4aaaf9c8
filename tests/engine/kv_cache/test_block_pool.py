"""BlockPool and its free queue: reuse order, reference counts, eviction of cached blocks."""

import pytest

from adaptserve.engine.kv_cache import BlockPool, KVCacheBlock, hash_block_tokens
from adaptserve.engine.kv_cache.block_pool import FreeBlockQueue


def free_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_block_queue]


def test_free_queue_remove_from_middle_and_ends():
    blocks = [KVCacheBlock(block_id=i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    assert [b.block_id for b in queue] == [0, 1, 3, 4]
    assert len(queue) == 4
    assert queue.popleft() is blocks[0]
    queue.remove(blocks[4])
    queue.append(blocks[2])
    queue.appendleft(blocks[4])
    assert [b.block_id for b in queue] == [4, 1, 3, 2]
    assert len(queue) == 4
    assert blocks[0].prev_free_block is None and blocks[0].next_free_block is None
    with pytest.raises(ValueError):
        queue.remove(blocks[0])
    with pytest.raises(ValueError):
        queue.append(blocks[1])


def test_free_queue_popleft_empty_raises():
    queue = FreeBlockQueue([KVCacheBlock(block_id=0)])
    queue.popleft()
    assert len(queue) == 0
    assert list(queue) == []
    with pytest.raises(IndexError):
        queue.popleft()


def test_get_new_blocks_takes_from_front_with_one_reference():
    pool = BlockPool(num_blocks=6, enable_prefix_caching=True)
    blocks = pool.get_new_blocks(2)
    assert [b.block_id for b in blocks] == [0, 1]
    assert [b.ref_cnt for b in blocks] == [1, 1]
    assert pool.num_free_blocks == 4
    assert pool.usage == pytest.approx(2 / 6)
    assert free_ids(pool) == [2, 3, 4, 5]
    with pytest.raises(ValueError):
        pool.get_new_blocks(5)
    assert pool.num_free_blocks == 4


def test_freed_cached_block_goes_to_back_uncached_to_front():
    pool = BlockPool(num_blocks=4, enable_prefix_caching=True)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_block(a, 111)
    pool.free_blocks([a, b])
    # b has no hash: reused first; a is cached: kept as long as possible.
    assert free_ids(pool) == [1, 2, 3, 0]
    assert pool.usage == 0.0


def test_touch_and_free_count_references():
    pool = BlockPool(num_blocks=3, enable_prefix_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, 7)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1
    assert pool.num_free_blocks == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 0
    assert free_ids(pool) == [1, 2, 0]
    # A prefix hit on a free cached block pulls it out of the middle of the queue.
    pool.touch([block])
    assert block.ref_cnt == 1
    assert free_ids(pool) == [1, 2]
    pool.free_blocks([block])
    with pytest.raises(ValueError):
        pool.free_blocks([block])


def test_reusing_cached_block_evicts_its_hash():
    pool = BlockPool(num_blocks=2, enable_prefix_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, 1)
    pool.cache_block(b, 2)
    pool.free_blocks([b, a])  # b is evicted first
    assert pool.get_cached_block(1) is a and pool.get_cached_block(2) is b
    (reused,) = pool.get_new_blocks(1)
    assert reused is b
    assert reused.block_hash is None
    assert pool.get_cached_block(2) is None
    assert pool.get_cached_block(1) is a
    assert pool.num_cached_blocks == 1


def test_cache_block_keeps_first_mapping():
    pool = BlockPool(num_blocks=2, enable_prefix_caching=True)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_block(a, 5)
    assert not pool.cache_block(b, 5)
    assert pool.get_cached_block(5) is a
    assert b.block_hash is None
    assert pool.cache_block(a, 5)  # idempotent
    with pytest.raises(ValueError):
        pool.cache_block(a, 6)


def test_reset_prefix_cache_only_when_all_free():
    pool = BlockPool(num_blocks=2, enable_prefix_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, 1)
    pool.free_blocks([a])
    assert not pool.reset_prefix_cache()
    assert pool.get_cached_block(1) is a
    pool.free_blocks([b])
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(1) is None
    assert a.block_hash is None
    assert pool.num_free_blocks == 2


def test_hash_block_tokens_is_chained_and_stable():
    h0 = hash_block_tokens(None, (1, 2, 3, 4))
    assert h0 == hash_block_tokens(None, [1, 2, 3, 4])
    assert h0 != hash_block_tokens(None, (1, 2, 3, 5))
    h1 = hash_block_tokens(h0, (5, 6, 7, 8))
    assert h1 != hash_block_tokens(None, (5, 6, 7, 8))
    assert h1 != hash_block_tokens(hash_block_tokens(None, (0, 2, 3, 4)), (5, 6, 7, 8))
    # Stable across processes and runs: a fixed value.
    assert h0 == 286052468457551270385320111621668108808
    assert isinstance(h0, int) and 0 <= h0 < 2**128
