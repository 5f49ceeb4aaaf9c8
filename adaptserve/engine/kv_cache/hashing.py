"""Chained hashes of full blocks: a block's hash names its tokens and every token before them."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_HASH_BYTES = 16  # 128-bit hashes: accidental collisions are out of reach for any cache size


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Hash one FULL block of tokens chained onto the hash of the block before it.

    `parent_hash` is None for a request's first block. Two blocks get the same hash exactly when
    their whole prefixes match, so equal hashes mean equal KV. We use BLAKE2b over little-endian
    int64 token ids rather than Python's `hash()`: it is stable across processes, runs and machines
    (prefix-cache keys can be shared or logged), and a prompt cannot be crafted to collide with
    another user's prefix. Cost is about a microsecond per block, and each block is hashed once.
    """
    parent = b"" if parent_hash is None else parent_hash.to_bytes(_HASH_BYTES, "little")
    payload = struct.pack(f"<{len(token_ids)}q", *token_ids)
    digest = hashlib.blake2b(parent + payload, digest_size=_HASH_BYTES).digest()
    return int.from_bytes(digest, "little")
