"""The runner's side of KV compression: the chunk geometry the block pool mirrors, one KVArena per
layer, the chunk-format table they share, and applying a step's chunk hand-overs and block
requantizations before its forward pass. A move copies a whole full block (the engine moves only
blocks it will never write again), so it may land in a whole-block format (int4k).
`compressed_attention` picks the attention that reads the arenas (Triton on CUDA, else the
reference)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from adaptserve.config import CacheConfig
from adaptserve.engine.kv_cache.formats import FORMAT_CODES, KV_FORMATS, KVLayout
from adaptserve.kernels.attention.compressed import CompressedKVAttention, KVErrorMonitor
from adaptserve.kernels.availability import triton_available
from adaptserve.model.config import ModelArchConfig
from adaptserve.runner.kv_arena import KVArena

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVGeometry:
    """How KV memory is cut: `num_chunks` chunks of `chunk_bytes` per layer (plus one padding chunk);
    a chunk of format f holds `blocks_per_chunk[f]` blocks of `block_bytes[f]` bytes."""

    layout: KVLayout
    num_chunks: int
    chunk_bytes: int
    blocks_per_chunk: dict[str, int]
    block_bytes: dict[str, int]

    @property
    def max_blocks_per_chunk(self) -> int:
        return max(self.blocks_per_chunk.values())

    @property
    def num_block_ids(self) -> int:
        """The block-id space, padding chunk excluded: id = chunk * max_blocks_per_chunk + index."""
        return self.num_chunks * self.max_blocks_per_chunk

    @classmethod
    def plan(cls, cache: CacheConfig, arch: ModelArchConfig, dtype: torch.dtype, num_native_blocks: int):
        """Cut the memory of `num_native_blocks` blocks in the model's dtype into chunks."""
        group = cache.kv_int4_group_size
        layout = KVLayout(cache.block_size, arch.num_kv_heads, arch.head_dim, dtype, int4_group_size=group)
        chunk_bytes = cache.kv_chunk_blocks * layout.format("bf16").block_bytes
        block_bytes = {name: layout.format(name).block_bytes for name in KV_FORMATS}
        return cls(
            layout=layout,
            num_chunks=max(1, num_native_blocks // cache.kv_chunk_blocks),
            chunk_bytes=chunk_bytes,
            blocks_per_chunk={name: chunk_bytes // size for name, size in block_bytes.items()},
            block_bytes=block_bytes,
        )


MOVE_ELEMENTS = 1 << 24  # K (and V) elements requantized per pass of a move step: 64 MB in float32


class CompressedKVCache:
    """Every layer's arena over one chunk-format table. The layers' bytes are slices of one tensor, so
    that block moves run once over all layers (`all_layers`: one arena whose chunks are every
    layer's, layer by layer) instead of once per layer: a move step of the 8B preset launched its
    read and requantization kernels 32 times (15 ms per move step in a cProfile of the H100 ramp)."""

    def __init__(self, geometry: KVGeometry, num_layers: int, device: torch.device):
        self.geometry = geometry
        g = geometry
        # the padding chunk (last) stays bf16: padded rows write and read there
        self.chunk_formats = torch.zeros(g.num_chunks + 1, dtype=torch.int8, device=device)  # [C + 1]
        num_chunks, formats = g.num_chunks + 1, self.chunk_formats
        memory = torch.zeros(num_layers * num_chunks, g.chunk_bytes, dtype=torch.uint8, device=device)
        self.arenas = [
            KVArena(
                g.layout,
                num_chunks,
                g.chunk_bytes,
                g.max_blocks_per_chunk,
                formats,
                device,
                memory=memory[layer * num_chunks : (layer + 1) * num_chunks],
            )  # fmt: skip
            for layer in range(num_layers)
        ]
        # layer l's block b is block l * num_chunks * max_blocks_per_chunk + b here, under the same
        # format table (KVArena._locate reads it per layer)
        self.all_layers = KVArena(
            g.layout, num_layers * num_chunks, g.chunk_bytes, g.max_blocks_per_chunk, formats, device,
            memory=memory,
        )  # fmt: skip
        self._layer_offsets = torch.arange(num_layers, device=device) * num_chunks * g.max_blocks_per_chunk
        self.num_requantized_blocks = 0

    def layer_caches(self) -> list[tuple[KVArena, KVArena]]:
        """The per-layer (k_cache, v_cache) pairs the model passes on: both are the layer's arena."""
        return [(arena, arena) for arena in self.arenas]

    def apply(self, chunk_formats: list[tuple[int, str]], migrations: list[tuple[int, int]]) -> None:
        """A step's memory changes, before its forward pass: every moved block is read in its old
        chunk's format, then the chunks handed to a format take it, then the copies are written (a
        chunk a move emptied may already hold the next move's destination). Moves run over all
        layers at once."""
        device = self.chunk_formats.device
        if migrations:
            src = self._every_layer([s for s, _ in migrations])  # [L * M]
            dtype = self.geometry.layout.native_dtype
            k, v = self.all_layers.read_blocks(src, dtype)  # [L * M, bs, H, D] each
        if chunk_formats:
            chunks = torch.tensor([c for c, _ in chunk_formats], device=device)
            codes = torch.tensor([FORMAT_CODES[f] for _, f in chunk_formats], dtype=torch.int8, device=device)
            self.chunk_formats[chunks] = codes
        if migrations:
            dst = self._every_layer([d for _, d in migrations])  # [L * M]
            # whole blocks (int4k keys take per-channel scales), a few layers at a time: quantizing
            # holds float32 copies of what it writes
            layer_elements = len(migrations) * k[0].numel()  # one layer's moved K
            step = len(migrations) * max(1, MOVE_ELEMENTS // layer_elements)  # rows per pass
            for start in range(0, dst.shape[0], step):
                rows = slice(start, start + step)
                self.all_layers.write_blocks(dst[rows], k[rows], v[rows])
            self.num_requantized_blocks += len(migrations)

    def _every_layer(self, block_ids: list[int]) -> torch.Tensor:
        """Block ids [M] of one layer -> [L * M]: the same blocks in every layer, in all_layers' ids."""
        ids = torch.tensor(block_ids, device=self.chunk_formats.device)  # [M]
        return (self._layer_offsets[:, None] + ids[None, :]).flatten()  # [L * M]


def compressed_attention(
    cache: CacheConfig, arch: ModelArchConfig, compressed: CompressedKVCache
) -> CompressedKVAttention:
    """The attention over `compressed`: its Triton kernels on CUDA where the layout suits them (else
    the torch reference), with an error monitor over the formats the cache may write."""
    ladder = cache.kv_ladder if cache.kv_policy == "adaptive" else (cache.kv_format,)
    monitor = KVErrorMonitor(tuple(ladder), cache.kv_monitor_rate)
    arena = compressed.arenas[0]
    use_triton = arena.bytes.device.type == "cuda" and triton_available()
    if use_triton:
        from adaptserve.kernels.attention.triton_kv_compressed import unsupported_reason

        reason = unsupported_reason(arena)
        if reason is not None:
            logger.warning("compressed KV runs the torch reference attention: %s", reason)
            use_triton = False
    heads = (arch.num_heads, arch.num_kv_heads, arch.head_dim)
    return CompressedKVAttention(arch.num_layers, heads, monitor, use_triton=use_triton)
