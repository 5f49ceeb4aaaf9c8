"""Where a block of a compressed KV cache (KVArena) lives, for the Triton kernels that write it
(triton_kv_write.py) and read it (triton_kv_compressed.py), and which arenas those kernels can serve.

Both take the arena's bytes as one uint8 pointer and find a block the way KVArena does: block id =
chunk * max_blocks_per_chunk + index, format code = chunk_formats[chunk], the block's bytes at
chunk * chunk_bytes + index * block_bytes(format), regions [K data][V data][K scales][V scales] as
engine/kv_cache/formats.py lays them out. Typed loads and stores go through cast pointers. The byte
sizes of each format's regions come from FormatLayout as compile-time constants, so the kernels hold
no second copy of the layout. Format codes are indices in KV_FORMATS: 0 bf16, 1 fp8, 2 int8, 3 int4k,
4 int4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptserve.engine.kv_cache.formats import KV_FORMATS
from adaptserve.runner.kv_arena import KVArena

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_MIN_ROWS = 16  # tl.dot needs every dimension >= 16: the query group is padded, and a block is a tile


@triton.jit
def _block_regions(chunk_base, index, CODE: tl.constexpr, FORMATS: tl.constexpr):
    """Byte pointers to the four regions (K data, V data, K scales, V scales) of block `index` of a
    chunk in format CODE. The index is clamped to the chunk's blocks in that format, as KVArena does:
    never a byte outside the chunk."""
    DATA: tl.constexpr = FORMATS[CODE][0]
    K_SCALE: tl.constexpr = FORMATS[CODE][1]
    V_SCALE: tl.constexpr = FORMATS[CODE][2]
    block = chunk_base + tl.minimum(index, FORMATS[CODE][3] - 1) * (2 * DATA + K_SCALE + V_SCALE)
    return block, block + DATA, block + 2 * DATA, block + 2 * DATA + K_SCALE


def supports(arena: KVArena) -> bool:
    """Whether these kernels can serve `arena` (see `unsupported_reason`)."""
    return unsupported_reason(arena) is None


def unsupported_reason(arena: KVArena) -> str | None:
    """Why these kernels cannot serve `arena`, for a person; None when they can."""
    layout = arena.layout
    head_dim, block_size = layout.head_dim, layout.block_size
    if head_dim & (head_dim - 1) or head_dim < _MIN_ROWS:
        return f"head_dim={head_dim} must be a power of two >= {_MIN_ROWS}"
    if block_size & (block_size - 1) or block_size < _MIN_ROWS:
        return f"block_size={block_size} must be a power of two >= {_MIN_ROWS} (one block is one tile)"
    if layout.native_dtype not in _TL_DTYPES:
        return f"native dtype {layout.native_dtype} must be one of {list(_TL_DTYPES)}"
    if arena.chunk_formats.dtype != torch.int8 or arena.chunk_formats.device != arena.bytes.device:
        return "chunk_formats must be an int8 tensor on the arena's device"
    return None


def _check_arena(arena: KVArena) -> None:
    reason = unsupported_reason(arena)
    if reason is not None:
        raise ValueError(f"the compressed-KV Triton kernels cannot serve this arena: {reason}")


def _layout_constants(arena: KVArena) -> dict:
    """The arena's geometry and, per format code, (data bytes, K scale bytes, V scale bytes, blocks per
    chunk) of one block: FormatLayout's numbers, as kernel constants."""
    layout = arena.layout
    formats = tuple(
        (
            arena.views[name].fmt.data_bytes,
            arena.views[name].fmt.k_scale_bytes,
            arena.views[name].fmt.v_scale_bytes,
            arena.views[name].blocks_per_chunk,
        )
        for name in KV_FORMATS
    )
    return dict(
        NUM_KV_HEADS=layout.num_kv_heads,
        HEAD_DIM=layout.head_dim,
        BLOCK_SIZE=layout.block_size,
        INT4_GROUP=layout.int4_group_size,
        MAX_BLOCKS_PER_CHUNK=arena.max_blocks_per_chunk,
        NATIVE_DTYPE=_TL_DTYPES[layout.native_dtype],
        FORMATS=formats,
    )
