"""A block pool over chunks of memory that each hold blocks of one KV format.

KV memory is cut into equal chunks; a chunk holds `chunk_bytes // block_bytes(format)` blocks of the
format it was handed to, so a chunk of int4 blocks holds about 3.5 times as many as one of bf16
blocks. `write_format` is the KV policy's knob: cold blocks are requantized into it, and new blocks
are taken in `token_format`, the same format unless it is a whole-block one (int4k, see formats.py),
whose new blocks are taken in its per-token stand-in (int8) and reach int4k only as full blocks moved
by requantization (`get_new_blocks(..., for_move=True)`). With `hot_window` on, new blocks are
always taken in bf16 (the model's dtype), whatever the write format, and the write format receives
only moves: the same split, for every format (KIVI's full-precision window of recent tokens; which
blocks stay is the manager's `keep_recent_blocks`). A chunk whose blocks are all
unreferenced goes back to the free chunks (at once when none holds a cached prefix; otherwise when a
format needs a chunk, evicting those prefixes), so memory freed in one format is usable by another.

Block ids are `chunk * max_blocks_per_chunk + index`. Every chunk handed to a format is recorded in
`chunk_format_changes` (drained into each step's SchedulerOutput: the runner's chunk-format table
follows it). Same interface as BlockPool, which the KV cache manager uses.
"""

from __future__ import annotations

from collections.abc import Iterable

from adaptserve.engine.kv_cache.block import KVCacheBlock
from adaptserve.engine.kv_cache.block_pool import FreeBlockQueue, PrefixCache
from adaptserve.engine.kv_cache.formats import token_format


class ChunkedBlockPool(PrefixCache):
    def __init__(
        self,
        num_chunks: int,
        blocks_per_chunk: dict[str, int],
        block_bytes: dict[str, int],
        write_format: str,
        enable_prefix_caching: bool,
        reserve_chunks: int = 0,
        hot_window: bool = False,
    ):
        if num_chunks < 1:
            raise ValueError(f"the KV cache needs at least one chunk, got {num_chunks}")
        self.num_chunks = num_chunks
        self.blocks_per_chunk = dict(blocks_per_chunk)
        self.block_bytes = dict(block_bytes)
        self.max_blocks_per_chunk = max(blocks_per_chunk.values())
        self.num_blocks = num_chunks * self.max_blocks_per_chunk  # the id space (not all usable at once)
        # what usage divides by: the most bytes a chunk's blocks can take, over every chunk
        self.total_bytes = num_chunks * max(n * block_bytes[f] for f, n in blocks_per_chunk.items())
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(block_id=i) for i in range(self.num_blocks)]
        self.queues = {name: FreeBlockQueue([]) for name in blocks_per_chunk}
        self.chunk_format: list[str | None] = [None] * num_chunks
        self.chunk_referenced = [0] * num_chunks  # blocks with ref_cnt > 0, per chunk
        self.free_chunks = list(range(num_chunks - 1, -1, -1))  # a stack: lowest chunk first
        self.idle_chunks: dict[str, set[int]] = {name: set() for name in blocks_per_chunk}
        self.referenced_blocks = dict.fromkeys(blocks_per_chunk, 0)
        self.cached_blocks: dict[int, KVCacheBlock] = {}
        self.chunk_format_changes: list[tuple[int, str]] = []
        self.hot_window = hot_window  # new tokens in bf16 at every write format; only moves go lower
        self.write_format = write_format
        # chunks only requantization may take: moving blocks to a lower format needs room to move into
        self.reserve_chunks = reserve_chunks

    @property
    def write_format(self) -> str:
        return self._write_format

    @write_format.setter
    def write_format(self, name: str) -> None:
        if name not in self.blocks_per_chunk or token_format(name) not in self.blocks_per_chunk:
            raise ValueError(f"unknown KV format {name!r}; known: {sorted(self.blocks_per_chunk)}")
        self._write_format = name

    @property
    def token_format(self) -> str:
        """The format new blocks (filled a token at a time) are taken in: bf16 with the hot window on."""
        return "bf16" if self.hot_window else token_format(self._write_format)

    def chunk_of(self, block: KVCacheBlock) -> int:
        return block.block_id // self.max_blocks_per_chunk

    def format_of(self, block: KVCacheBlock) -> str:
        return self.chunk_format[self.chunk_of(block)]

    @property
    def num_free_blocks(self) -> int:
        """Blocks of the token format that can be handed out now (reclaiming idle chunks included),
        the reserve kept back."""
        return self._free_blocks(self.token_format, self.reserve_chunks)

    @property
    def num_free_blocks_for_moves(self) -> int:
        """Blocks of the write format requantization may take: the reserve included."""
        return self._free_blocks(self._write_format, 0)

    def _free_blocks(self, name: str, reserve: int) -> int:
        spare = len(self.free_chunks) + sum(len(c) for n, c in self.idle_chunks.items() if n != name)
        return len(self.queues[name]) + max(0, spare - reserve) * self.blocks_per_chunk[name]

    def free_capacity_after(self, hit_blocks: Iterable[KVCacheBlock]) -> int:
        """`num_free_blocks` once the prefix hits `hit_blocks` are referenced."""
        name, lost, lost_chunks = self.token_format, 0, set()
        for block in hit_blocks:
            if block.ref_cnt:
                continue
            chunk = self.chunk_of(block)
            if self.chunk_format[chunk] == name:
                lost += 1
            elif chunk in self.idle_chunks[self.chunk_format[chunk]]:
                lost_chunks.add(chunk)
        return self.num_free_blocks - lost - len(lost_chunks) * self.blocks_per_chunk[name]

    @property
    def usage(self) -> float:
        """Share of the KV memory held by referenced blocks, by bytes, in [0, 1]."""
        held = sum(n * self.block_bytes[name] for name, n in self.referenced_blocks.items())
        return held / self.total_bytes

    def usage_by_format(self) -> dict[str, int]:
        """Referenced blocks per format."""
        return dict(self.referenced_blocks)

    def get_new_blocks(self, num_blocks: int, for_move: bool = False) -> list[KVCacheBlock]:
        """`num_blocks` blocks, each with ref_cnt 1 and no hash: of the token format for new tokens, or
        with `for_move` of the write format, the reserve included, for whole blocks requantization
        copies (the only blocks a whole-block format like int4k receives)."""
        name = self._write_format if for_move else self.token_format
        free = self.num_free_blocks_for_moves if for_move else self.num_free_blocks
        if num_blocks > free:
            raise ValueError(f"asked for {num_blocks} blocks, only {free} are free")
        queue = self.queues[name]
        new_blocks = []
        for _ in range(num_blocks):
            if not len(queue):
                self._take_chunk(name)
            block = queue.popleft()
            self._evict(block)
            self._reference(block)
            new_blocks.append(block)
        return new_blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        for block in blocks:
            if block.ref_cnt == 0:
                self.queues[self.format_of(block)].remove(block)
                self._reference(block)
            else:
                block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than it was referenced")
            block.ref_cnt -= 1
            if block.ref_cnt > 0:
                continue
            chunk, name = self.chunk_of(block), self.format_of(block)
            queue = self.queues[name]
            queue.append(block) if block.block_hash is not None else queue.appendleft(block)
            self.referenced_blocks[name] -= 1
            self.chunk_referenced[chunk] -= 1
            if self.chunk_referenced[chunk] == 0:
                self.idle_chunks[name].add(chunk)
                if not any(b.block_hash is not None for b in self._chunk_blocks(chunk)):
                    self._release(chunk)

    def reset_prefix_cache(self) -> bool:
        if any(self.referenced_blocks.values()):
            return False
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        for chunks in self.idle_chunks.values():
            for chunk in list(chunks):
                self._release(chunk)
        return True

    def drain_chunk_format_changes(self) -> list[tuple[int, str]]:
        changes, self.chunk_format_changes = self.chunk_format_changes, []
        return changes

    def _chunk_blocks(self, chunk: int) -> list[KVCacheBlock]:
        start = chunk * self.max_blocks_per_chunk
        return self.blocks[start : start + self.blocks_per_chunk[self.chunk_format[chunk]]]

    def _reference(self, block: KVCacheBlock) -> None:
        chunk, name = self.chunk_of(block), self.format_of(block)
        block.ref_cnt = 1
        self.referenced_blocks[name] += 1
        if self.chunk_referenced[chunk] == 0:
            self.idle_chunks[name].discard(chunk)
        self.chunk_referenced[chunk] += 1

    def _take_chunk(self, name: str) -> None:
        """Hand a free chunk (or an idle one of another format, evicting its prefixes) to `name`."""
        if not self.free_chunks:
            donor = next(n for n, chunks in self.idle_chunks.items() if chunks and n != name)
            self._release(next(iter(self.idle_chunks[donor])))
        chunk = self.free_chunks.pop()
        self.chunk_format[chunk] = name
        self.chunk_format_changes.append((chunk, name))
        queue = self.queues[name]
        start = chunk * self.max_blocks_per_chunk
        for block in reversed(self.blocks[start : start + self.blocks_per_chunk[name]]):
            queue.appendleft(block)  # lowest index first

    def _release(self, chunk: int) -> None:
        """An idle chunk leaves its format: its free blocks leave the queue, cached prefixes are evicted."""
        name = self.chunk_format[chunk]
        for block in self._chunk_blocks(chunk):
            self.queues[name].remove(block)
            self._evict(block)
        self.idle_chunks[name].discard(chunk)
        self.chunk_format[chunk] = None
        self.free_chunks.append(chunk)
