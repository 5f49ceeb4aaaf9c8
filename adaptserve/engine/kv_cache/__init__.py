"""KV-cache bookkeeping in pure Python: blocks, the block pool and the per-request manager."""

from adaptserve.engine.kv_cache.block import KVCacheBlock
from adaptserve.engine.kv_cache.block_pool import BlockPool
from adaptserve.engine.kv_cache.hashing import hash_block_tokens
from adaptserve.engine.kv_cache.manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheBlock", "KVCacheManager", "hash_block_tokens"]
