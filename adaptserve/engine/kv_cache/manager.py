"""Per-request KV block tables on top of the block pool, with prefix caching."""

from __future__ import annotations

from typing import Protocol

from adaptserve.engine.kv_cache.block import KVCacheBlock
from adaptserve.engine.kv_cache.block_pool import BlockPool
from adaptserve.engine.kv_cache.chunk_pool import ChunkedBlockPool
from adaptserve.engine.kv_cache.hashing import hash_block_tokens


class KVRequest(Protocol):
    """What the manager reads from a request (`adaptserve.engine.request.Request` fits)."""

    request_id: str
    num_computed_tokens: int

    @property
    def all_token_ids(self) -> list[int]: ...

    @property
    def num_tokens(self) -> int: ...


class KVCacheManager:
    """Gives each request the blocks its tokens need and shares full blocks through a prefix cache.

    A scheduler uses it per request and step (as in vLLM v1):
    1. new or resumed request: `hit_blocks, num_hit_tokens = get_computed_blocks(request)`;
    2. `allocate_slots(request, num_new_tokens, hit_blocks)`; None means "not enough memory now"
       and nothing changed. Call it right after step 1, with no other allocation in between, or
       the hit blocks may have been evicted meanwhile;
    3. the caller adds `num_hit_tokens + num_new_tokens` to `request.num_computed_tokens`;
    4. `free(request)` when it finishes, is aborted or is preempted.

    A block is registered in the prefix cache in the step whose forward pass writes its last token,
    so a sibling request (n > 1) scheduled later in the same step can already hit it: the runner
    writes all KV of a step before attention reads it.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        block_pool: BlockPool | ChunkedBlockPool | None = None,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # a ChunkedBlockPool when the cache holds several KV formats (KV compression)
        self.block_pool = block_pool or BlockPool(num_blocks, enable_prefix_caching)
        self.num_blocks = self.block_pool.num_blocks
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Hashes of the request's full blocks so far, computed once each (incremental hashing).
        self.req_to_block_hashes: dict[str, list[int]] = {}
        # How many leading blocks of the request have been offered to the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        # Prefix-cache stats count a request once per life (until free), not per scheduling attempt,
        # so a request that waits several steps for memory does not inflate the hit rate.
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # of those, tokens found in the cache
        self._counted_request_ids: set[str] = set()

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request references (cached ones included: they can be evicted)."""
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests, in [0, 1]."""
        return self.block_pool.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit tokens over queried tokens since start (0.0 before any query)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table: block ids in token order ([] for an unknown request)."""
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: KVRequest) -> tuple[list[KVCacheBlock], int]:
        """The longest run of the request's leading full blocks found in the prefix cache.

        Returns the blocks and the number of tokens they cover. At least one token is always left
        to compute (the model needs it to produce logits), so a prompt of exactly N full blocks hits
        at most N - 1. Takes no references; pass the blocks to `allocate_slots`.
        """
        if not self.enable_prefix_caching:
            return [], 0
        block_hashes = self._update_block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hit_blocks = []
        for block_hash in block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hit_blocks.append(block)
        num_hit_tokens = len(hit_blocks) * self.block_size
        if request.request_id not in self._counted_request_ids:
            self._counted_request_ids.add(request.request_id)
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit_tokens
        return hit_blocks, num_hit_tokens

    def allocate_slots(
        self,
        request: KVRequest,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock] | None:
        """Make the request own blocks for its computed tokens, its hits and `num_new_tokens` more.

        `new_computed_blocks` are the hits from `get_computed_blocks`, not yet counted in
        `request.num_computed_tokens`. Returns the newly allocated blocks (hits excluded), or None
        when too few blocks are free; then nothing changes.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        hit_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks.get(request.request_id, [])
        if hit_blocks:
            self._check_hit_blocks(request, req_blocks, hit_blocks)
        num_tokens_after = request.num_computed_tokens + len(hit_blocks) * self.block_size + num_new_tokens
        num_required_blocks = -(-num_tokens_after // self.block_size)
        num_new_blocks = max(0, num_required_blocks - len(req_blocks) - len(hit_blocks))
        # Touching a free hit block takes it out of the free queue, so it cannot also be handed out.
        if num_new_blocks > self.block_pool.free_capacity_after(hit_blocks):
            return None

        self.block_pool.touch(hit_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
        req_blocks.extend(hit_blocks)
        req_blocks.extend(new_blocks)
        if self.enable_prefix_caching:
            num_done = self.num_cached_blocks.get(request.request_id, 0)
            self.num_cached_blocks[request.request_id] = max(num_done, len(hit_blocks))
            self._cache_full_blocks(request, min(num_tokens_after, request.num_tokens))
        return new_blocks

    def free(self, request: KVRequest) -> None:
        """Release the request's blocks, tail first, so its tail is evicted before its head."""
        request_id = request.request_id
        req_blocks = self.req_to_blocks.pop(request_id, [])
        self.block_pool.free_blocks(reversed(req_blocks))
        self.req_to_block_hashes.pop(request_id, None)
        self.num_cached_blocks.pop(request_id, None)
        self._counted_request_ids.discard(request_id)

    def trim(self, request: KVRequest) -> None:
        """Free the request's blocks past its computed tokens (rejected speculative drafts' blocks).
        Those blocks held no known token, so none of them is in the prefix cache."""
        req_blocks = self.req_to_blocks.get(request.request_id)
        if not req_blocks:
            return
        num_needed = -(-request.num_computed_tokens // self.block_size)
        if len(req_blocks) > num_needed:
            surplus = req_blocks[num_needed:]
            del req_blocks[num_needed:]
            self.block_pool.free_blocks(reversed(surplus))

    def requantize_cold(
        self, max_blocks: int, keep_recent_blocks: int, settled_tokens: dict[str, int] | None = None
    ) -> list[tuple[int, int]]:
        """Move up to `max_blocks` cold blocks (all but each request's last `keep_recent_blocks`,
        held by one request only) whose format is above the write format into new blocks of the write
        format. Blocks of the emptiest chunks go first, so whole chunks come free. Returns the
        (source, destination) block ids; the runner copies them before the next step's writes.

        Into a format new tokens are not written in (a whole-block format like int4k, or any lower
        format when the pool's hot window keeps new tokens in bf16) only full blocks that are never
        written again may move: those within `settled_tokens[request id]`, the request's computed
        tokens that no rejected draft can roll back (required then; a block partly held by in-flight
        drafts may be trimmed and refilled a token at a time)."""
        pool = self.block_pool
        if not isinstance(pool, ChunkedBlockPool) or max_blocks <= 0:
            return []
        target = pool.write_format
        rank = list(pool.blocks_per_chunk)  # formats, high to low precision
        if target == rank[0]:  # nothing is above the write format: skip the scan (every step at bf16)
            return []
        whole_blocks = target != pool.token_format
        if whole_blocks and settled_tokens is None:
            raise ValueError(
                f"requantizing into {target} (whole blocks only: new tokens go to {pool.token_format}) "
                "needs settled_tokens per request"
            )
        candidates = []  # (chunk's referenced blocks, request id, position)
        for request_id, blocks in self.req_to_blocks.items():
            num_cold = max(0, len(blocks) - keep_recent_blocks)
            if whole_blocks:
                num_cold = min(num_cold, settled_tokens.get(request_id, 0) // self.block_size)
            for i, block in enumerate(blocks[:num_cold]):
                if block.ref_cnt == 1 and rank.index(pool.format_of(block)) < rank.index(target):
                    candidates.append((pool.chunk_referenced[pool.chunk_of(block)], request_id, i))
        candidates.sort()
        moves = []
        for _, request_id, i in candidates[: min(max_blocks, pool.num_free_blocks_for_moves)]:
            blocks = self.req_to_blocks[request_id]
            src, (dst,) = blocks[i], pool.get_new_blocks(1, for_move=True)
            pool.move_hash(src, dst)
            blocks[i] = dst
            pool.free_blocks([src])
            moves.append((src.block_id, dst.block_id))
        return moves

    def reset_prefix_cache(self) -> bool:
        """Forget all cached blocks; only possible (returns True) when no block is referenced."""
        return self.block_pool.reset_prefix_cache()

    def _update_block_hashes(self, request: KVRequest) -> list[int]:
        """Extend the request's list of full-block hashes to cover all its current full blocks."""
        block_hashes = self.req_to_block_hashes.setdefault(request.request_id, [])
        num_full_blocks = request.num_tokens // self.block_size
        if len(block_hashes) < num_full_blocks:
            token_ids = request.all_token_ids
            parent_hash = block_hashes[-1] if block_hashes else None
            for i in range(len(block_hashes), num_full_blocks):
                start = i * self.block_size
                parent_hash = hash_block_tokens(parent_hash, token_ids[start : start + self.block_size])
                block_hashes.append(parent_hash)
        return block_hashes

    def _cache_full_blocks(self, request: KVRequest, num_tokens_written: int) -> None:
        """Register the request's blocks that are full once `num_tokens_written` tokens have KV."""
        request_id = request.request_id
        num_full_blocks = num_tokens_written // self.block_size
        num_done = self.num_cached_blocks.get(request_id, 0)
        if num_full_blocks <= num_done:
            return
        block_hashes = self._update_block_hashes(request)
        req_blocks = self.req_to_blocks[request_id]
        for i in range(num_done, num_full_blocks):
            self.block_pool.cache_block(req_blocks[i], block_hashes[i])
        self.num_cached_blocks[request_id] = num_full_blocks

    def _check_hit_blocks(
        self, request: KVRequest, req_blocks: list[KVCacheBlock], hit_blocks: list[KVCacheBlock]
    ) -> None:
        # Hits only make sense for a request that holds no blocks yet, and they must still be cached
        # under the request's own hashes (an allocation in between could have evicted them).
        if req_blocks or request.num_computed_tokens:
            raise ValueError(
                f"request {request.request_id}: new_computed_blocks given, but it already has "
                f"{len(req_blocks)} blocks and {request.num_computed_tokens} computed tokens"
            )
        block_hashes = self.req_to_block_hashes.get(request.request_id, [])
        for i, block in enumerate(hit_blocks):
            if i >= len(block_hashes) or block.block_hash != block_hashes[i]:
                raise ValueError(
                    f"request {request.request_id}: hit block {i} (id {block.block_id}) is no longer "
                    "cached under the request's hash; call allocate_slots right after get_computed_blocks"
                )
