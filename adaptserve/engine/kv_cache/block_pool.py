"""All KV blocks of one cache: who is free, in what order to reuse them, and which are cached."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from adaptserve.engine.kv_cache.block import KVCacheBlock


class FreeBlockQueue:
    """Doubly-linked list of free blocks threaded through the blocks themselves.

    Every operation is O(1), including `remove` from the middle, which a prefix hit on a free
    cached block needs. Blocks are taken from the front.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]):
        # Sentinels at both ends, so no operation has to special-case an empty list.
        self._head = KVCacheBlock(block_id=-1)
        self._tail = KVCacheBlock(block_id=-1)
        self._head.next_free_block = self._tail
        self._tail.prev_free_block = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self.num_free_blocks

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Free blocks from front (next to be reused) to back."""
        block = self._head.next_free_block
        while block is not self._tail:
            yield block
            block = block.next_free_block

    def popleft(self) -> KVCacheBlock:
        """Take the block at the front."""
        block = self._head.next_free_block
        if block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink `block`, wherever it is in the queue."""
        prev, next_ = block.prev_free_block, block.next_free_block
        if prev is None or next_ is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free_block = next_
        next_.prev_free_block = prev
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Put `block` at the back: reused last."""
        self._insert_after(self._tail.prev_free_block, block)

    def appendleft(self, block: KVCacheBlock) -> None:
        """Put `block` at the front: reused first."""
        self._insert_after(self._head, block)

    def _insert_after(self, prev: KVCacheBlock, block: KVCacheBlock) -> None:
        if block.prev_free_block is not None or block.next_free_block is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        next_ = prev.next_free_block
        block.prev_free_block, block.next_free_block = prev, next_
        prev.next_free_block = block
        next_.prev_free_block = block
        self.num_free_blocks += 1


class PrefixCache:
    """The prefix-cache map `block_hash -> block` both block pools keep (BlockPool, ChunkedBlockPool)."""

    cached_blocks: dict[int, KVCacheBlock]

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, referenced or not."""
        return len(self.cached_blocks)

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        """The block registered under `block_hash`, or None."""
        return self.cached_blocks.get(block_hash)

    def cache_block(self, block: KVCacheBlock, block_hash: int) -> bool:
        """Register a full block under `block_hash`; returns whether it was registered.

        When another block already holds `block_hash`, that mapping is kept and `block` stays
        uncached (its KV is a duplicate that nobody can hit).
        """
        if block.block_hash is not None:
            if block.block_hash != block_hash:
                raise ValueError(f"block {block.block_id} is already cached under another hash")
            return True
        if block_hash in self.cached_blocks:
            return False
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block
        return True

    def move_hash(self, src: KVCacheBlock, dst: KVCacheBlock) -> None:
        """dst takes src's place in the prefix cache (a requantized copy of the same tokens)."""
        if src.block_hash is not None:
            dst.block_hash, src.block_hash = src.block_hash, None
            self.cached_blocks[dst.block_hash] = dst

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            block.block_hash = None


class BlockPool(PrefixCache):
    """Owns every `KVCacheBlock`, the free queue and the prefix-cache map `block_hash -> block`.

    Reuse order: new blocks come from the front of the free queue. A freed block that holds a
    cached (hashed) block goes to the back, so unreferenced cached blocks are evicted in LRU order;
    a freed block with no hash is worth nothing to keep, so it goes to the front and is reused
    first (LIFO). Taking a cached block for reuse evicts it: its hash leaves the map.
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(block_id=i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[int, KVCacheBlock] = {}  # block_hash -> block

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no references, cached or not: all can be handed out."""
        return self.free_block_queue.num_free_blocks

    def free_capacity_after(self, hit_blocks: Iterable[KVCacheBlock]) -> int:
        """`num_free_blocks` once the prefix hits `hit_blocks` are referenced (free hits leave the queue)."""
        return self.num_free_blocks - sum(1 for block in hit_blocks if block.ref_cnt == 0)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` blocks from the front of the free queue, evicting any cached ones.

        Each returned block has `ref_cnt == 1` and no hash. Raises ValueError when fewer than
        `num_blocks` are free; check `num_free_blocks` first.
        """
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, only {self.num_free_blocks} are free")
        new_blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on each block (prefix hits); free ones leave the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference on each block, in order; blocks reaching zero join the free queue.

        Cached blocks are appended in the given order, so pass them in the order they should be
        evicted (the manager passes a request's blocks tail first).
        """
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than it was referenced")
            block.ref_cnt -= 1
            if block.ref_cnt > 0:
                continue
            if block.block_hash is None:
                self.free_block_queue.appendleft(block)
            else:
                self.free_block_queue.append(block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only done when no block is referenced; returns whether done."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        return True
