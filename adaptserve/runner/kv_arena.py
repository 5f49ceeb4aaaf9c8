"""One layer's compressed KV memory: chunks of bytes, each holding blocks of one format.

A block id is `chunk * max_blocks_per_chunk + index`; `chunk_formats[chunk]` (a device tensor every
layer shares, updated by the runner when the pool hands a chunk to another format) says how to read
it. For each format the arena keeps typed, strided views over the same bytes:
data [chunks, blocks, block_size, H, D'] and scales [chunks, blocks, block_size, H, S], for K and V
(int4k's K scales: [chunks, blocks, H, 2, D], per block, head and channel). Tokens are written with
`write`; whole blocks (the runner's requantization moves) with `write_blocks`, the only way into a
whole-block format (int4k): `write` refuses a slot in one. This is the torch reference; the Triton
kernels read the same bytes through the same offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptserve.engine.kv_cache.formats import KV_FORMATS, SCALE_DTYPE, FormatLayout, KVLayout
from adaptserve.kernels.kv_quant import (
    STORAGE_DTYPES,
    dequantize,
    dequantize_key_blocks,
    quantize,
    quantize_key_blocks,
    value_format,
)


@dataclass
class _FormatViews:
    fmt: FormatLayout
    k_data: torch.Tensor  # [C, n, bs, H, D']
    v_data: torch.Tensor
    k_scales: torch.Tensor | None  # [C, n, bs, H, S]; int4k: [C, n, H, 2, D]
    v_scales: torch.Tensor | None
    blocks_per_chunk: int


# (format name, rows [n] into the block ids, (chunk [n], index in chunk [n])): see KVArena.format_groups
FormatGroup = tuple[str, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


class KVArena:
    def __init__(
        self,
        layout: KVLayout,
        num_chunks: int,
        chunk_bytes: int,
        max_blocks_per_chunk: int,
        chunk_formats: torch.Tensor,
        device: torch.device,
        memory: torch.Tensor | None = None,
    ):
        """`memory`: the arena's [num_chunks, chunk_bytes] uint8 bytes when the caller allocated them
        (a slice of every layer's memory; see CompressedKVCache), else zeros of its own."""
        self.layout = layout
        self.chunk_bytes = chunk_bytes
        self.max_blocks_per_chunk = max_blocks_per_chunk
        # [C'] int8, shared by every layer; an arena over several layers' memory (C = n C') reads it
        # for each layer's chunks in turn (see _locate)
        self.chunk_formats = chunk_formats
        if memory is None:
            memory = torch.zeros(num_chunks, chunk_bytes, dtype=torch.uint8, device=device)
        if tuple(memory.shape) != (num_chunks, chunk_bytes) or not memory.is_contiguous():
            shape = tuple(memory.shape)
            raise ValueError(f"arena memory {shape} is not a contiguous [{num_chunks}, {chunk_bytes}]")
        self.bytes = memory  # [C, bytes]
        self.views = {name: self._views(layout.format(name)) for name in KV_FORMATS}

    def _views(self, fmt: FormatLayout) -> _FormatViews:
        layout, num_chunks = self.layout, self.bytes.shape[0]
        count = self.chunk_bytes // fmt.block_bytes
        blocks = self.bytes[:, : count * fmt.block_bytes].view(num_chunks, count, fmt.block_bytes)
        dtype = layout.native_dtype if fmt.name == "bf16" else STORAGE_DTYPES[fmt.name]
        shape = (num_chunks, count, layout.block_size, layout.num_kv_heads, -1)

        def region(start: int, size: int, region_dtype, region_shape=shape) -> torch.Tensor:
            return blocks[..., start : start + size].view(region_dtype).view(region_shape)

        scales = (None, None)
        if fmt.v_scale_bytes:
            k_shape = (
                (num_chunks, count, layout.num_kv_heads, 2, layout.head_dim) if fmt.whole_block else shape
            )
            scales = (
                region(fmt.k_scales, fmt.k_scale_bytes, SCALE_DTYPE, k_shape),
                region(fmt.v_scales, fmt.v_scale_bytes, SCALE_DTYPE),
            )
        return _FormatViews(
            fmt,
            region(fmt.k_data, fmt.data_bytes, dtype),
            region(fmt.v_data, fmt.data_bytes, dtype),
            *scales,
            count,
        )

    def _locate(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """block ids [N] -> (chunk [N], index in chunk [N], format code [N])."""
        block_ids = block_ids.long()
        chunks = block_ids // self.max_blocks_per_chunk
        codes = self.chunk_formats[chunks % self.chunk_formats.shape[0]].long()  # the chunk's layer's
        return chunks, block_ids % self.max_blocks_per_chunk, codes

    def format_groups(self, block_ids: torch.Tensor) -> list[FormatGroup]:
        """Block ids [N] grouped by their chunk's format: (format name, rows [n] into block_ids,
        (chunk [n], index in chunk [n])) per format present; a host sync. A padded table entry may
        point past a chunk's blocks: its index is clamped (its rows are masked, any block will do).
        Every arena of a cache shares the format table, so a step works this out once for all its
        layers and passes it to read_blocks / write_blocks (32 layers of syncs were a step's cost)."""
        chunks, index, codes = self._locate(block_ids)
        groups = []
        for code in codes.unique().tolist():
            name = KV_FORMATS[code]
            rows = (codes == code).nonzero().squeeze(1)  # [n]
            where = (chunks[rows], index[rows].clamp(max=self.views[name].blocks_per_chunk - 1))
            groups.append((name, rows, where))
        return groups

    def _by_format(self, block_ids: torch.Tensor, groups: list[FormatGroup] | None = None):
        for name, rows, where in self.format_groups(block_ids) if groups is None else groups:
            yield self.views[name], rows, where

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, H, D] quantized into their slots [T] (block_id * block_size + offset). A slot in a
        block of a whole-block format (int4k) is refused: those blocks are only written whole."""
        layout = self.layout
        offsets = slots.long() % layout.block_size
        for views, rows, block in self._by_format(slots // layout.block_size):
            if views.fmt.whole_block:
                raise ValueError(
                    f"cannot write single tokens into {views.fmt.name} blocks: that format is only "
                    "written as whole full blocks (write_blocks, the requantization of cold blocks)"
                )
            where = (*block, offsets[rows])
            for x, data, scales in ((k, views.k_data, views.k_scales), (v, views.v_data, views.v_scales)):
                q, s = quantize(x[rows], views.fmt.name, layout.int4_group_size, layout.native_dtype)
                data[where] = q
                if scales is not None:
                    scales[where] = s

    def write_blocks(
        self,
        block_ids: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        groups: list[FormatGroup] | None = None,
    ) -> None:
        """k, v: [M, block_size, H, D] quantized into whole blocks block_ids [M], each in its chunk's
        format; int4k keys take their per-channel scales over the block's tokens. `groups`: the
        ids' format_groups, when already known."""
        for views, rows, where in self._by_format(block_ids, groups):
            name = views.fmt.name
            if views.fmt.whole_block:
                views.k_data[where], views.k_scales[where] = quantize_key_blocks(k[rows])
                name = value_format(name)
            else:
                self._write_block_tokens(views.k_data, views.k_scales, where, k[rows], name)
            self._write_block_tokens(views.v_data, views.v_scales, where, v[rows], name)

    def _write_block_tokens(self, data, scales, where, x: torch.Tensor, name: str) -> None:
        """x [m, bs, H, D] quantized a token at a time in `name` into the blocks at `where`."""
        layout = self.layout
        q, s = quantize(x.flatten(0, 1), name, layout.int4_group_size, layout.native_dtype)  # [m * bs, H, *]
        data[where] = q.view(*x.shape[:2], *q.shape[1:])
        if scales is not None:
            scales[where] = s.view(*x.shape[:2], *s.shape[1:])

    def read_blocks(
        self, block_ids: torch.Tensor, dtype: torch.dtype, groups: list[FormatGroup] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """block ids [N] -> dequantized (k, v), each [N, block_size, H, D] in `dtype`. `groups`: the
        ids' format_groups, when already known."""
        layout = self.layout
        shape = (block_ids.shape[0], layout.block_size, layout.num_kv_heads, layout.head_dim)
        k = torch.empty(shape, dtype=dtype, device=self.bytes.device)
        v = torch.empty(shape, dtype=dtype, device=self.bytes.device)
        for views, rows, where in self._by_format(block_ids, groups):
            name = views.fmt.name
            if views.fmt.whole_block:
                k[rows] = dequantize_key_blocks(views.k_data[where], views.k_scales[where], dtype)
                name = value_format(name)
            else:
                k[rows] = self._read_block_tokens(views.k_data, views.k_scales, where, name, dtype)
            v[rows] = self._read_block_tokens(views.v_data, views.v_scales, where, name, dtype)
        return k, v

    def _read_block_tokens(self, data, scales, where, name: str, dtype) -> torch.Tensor:
        """The blocks at `where` of a per-token format's region -> [n, bs, H, D] in `dtype`."""
        layout = self.layout
        blocks = data[where]  # [n, bs, H, D']
        flat_scales = None if scales is None else scales[where].flatten(0, 1)  # [n * bs, H, S]
        values = dequantize(blocks.flatten(0, 1), flat_scales, name, layout.int4_group_size, dtype)
        return values.view(*blocks.shape[:3], layout.head_dim)

    def migrate(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole blocks src [M] -> dst [M], requantizing into each destination's format."""
        k, v = self.read_blocks(src, torch.float32)  # [M, bs, H, D]
        self.write_blocks(dst, k, v)
