"""The engine's side of KV compression: which block pool a cache gets, the cold blocks requantized
into the write format before each step, and the memory changes a step carries to the runner."""

from __future__ import annotations

from collections.abc import Mapping

from adaptserve.config import CacheConfig
from adaptserve.engine.kv_cache.block_pool import BlockPool
from adaptserve.engine.kv_cache.chunk_pool import ChunkedBlockPool
from adaptserve.engine.kv_cache.manager import KVCacheManager
from adaptserve.engine.outputs import SchedulerOutput
from adaptserve.engine.request import Request


def build_block_pool(cache: CacheConfig, runner) -> BlockPool | ChunkedBlockPool:
    """A ChunkedBlockPool over the runner's chunks when its cache is compressed, else a BlockPool."""
    compressed = getattr(runner, "compressed_kv", None)
    if compressed is None:
        return BlockPool(runner.num_blocks, cache.enable_prefix_caching)
    g = compressed.geometry
    # an adaptive cache, or one whose new tokens stay bf16 (hot window), keeps one chunk back, so cold
    # blocks always have room to move down into
    moves_down = cache.kv_policy == "adaptive" or cache.hot_window > 0
    reserve = 1 if moves_down and g.num_chunks > 1 else 0
    return ChunkedBlockPool(
        g.num_chunks,
        g.blocks_per_chunk,
        g.block_bytes,
        cache.kv_format,
        cache.enable_prefix_caching,
        reserve,
        hot_window=cache.hot_window > 0,
    )


def requantize_cold_blocks(
    kv_cache: KVCacheManager, cache: CacheConfig, requests: Mapping[str, Request]
) -> list[tuple[int, int]]:
    """Up to `kv_requantize_blocks` cold blocks (all but each request's newest
    `cache.num_recent_blocks`) moved into the write format (none for a plain cache). A write format
    new tokens are not written in (int4k; any lower format under the hot window) takes only blocks
    full of each request's settled tokens: computed, and not drafts still in flight (a rejected
    draft's block is refilled a token at a time, in the token format)."""
    pool = kv_cache.block_pool
    if not isinstance(pool, ChunkedBlockPool):
        return []
    settled = None
    if pool.write_format != pool.token_format:
        settled = {rid: r.num_computed_tokens - r.num_drafts_in_flight for rid, r in requests.items()}
    return kv_cache.requantize_cold(cache.kv_requantize_blocks, cache.num_recent_blocks, settled)


def attach_kv_changes(output: SchedulerOutput, kv_cache: KVCacheManager, migrations: list[tuple[int, int]]):
    """Give the step the chunks handed to a format since the last step, and the block moves."""
    pool = kv_cache.block_pool
    if isinstance(pool, ChunkedBlockPool):
        output.kv_chunk_formats = pool.drain_chunk_format_changes()
        output.kv_migrations = migrations
