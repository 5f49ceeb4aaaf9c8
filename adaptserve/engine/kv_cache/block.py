"""One page of the paged KV cache, as bookkeeping only (the tensors live in the model runner)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """A block of `block_size` token slots in every layer's KV tensor.

    `ref_cnt` counts the live requests whose block table holds this block; a block with
    `ref_cnt == 0` sits in the pool's free queue, still holding its KV until it is reused.
    `block_hash` is set only while the block is registered in the prefix cache, so an evicted or
    never-full block has `None`. Blocks compare by identity (`eq=False`).
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # chained hash of the full block's tokens; None = not cached
    # Links of the pool's doubly-linked free queue; both None while the block is in use.
    prev_free_block: KVCacheBlock | None = field(default=None, repr=False)
    next_free_block: KVCacheBlock | None = field(default=None, repr=False)
