"""Triton paged decode attention over a compressed KV cache (KVArena) that reads every block in its
own chunk's format and dequantizes it on the fly. Blocks are found as triton_kv_layout.py describes;
the matching write kernel is in triton_kv_write.py (re-exported here, with `supports` and
`unsupported_reason`, so callers import both kernels from this module).

One query token per sequence; the grid is (sequences, KV heads, splits). A program serves the G query
heads that share a KV head (padded to 16 rows for tl.dot) and walks its share of the context one block
at a time: it reads the block's format code once, dequantizes K and V of that block to float32 (fp8
and int8: data * scale; int4: code * scale + min; int4k: keys code * scale + min with the block's
scale and min per channel, values as int4), and accumulates with an online softmax in float32.
The dequantized tile is rounded to q's dtype for the dots (what the torch reference,
KVArena.read_blocks(ids, q.dtype), gives); under the interpreter, whose bf16 arithmetic is broken and
whose float32 -> bf16 cast truncates, the tile and the output are rounded with round_to_dtype and the
dots stay float32. Several splits write partial outputs that triton_decode's merge kernel combines.
Nothing reads device values on the host: CUDA-graph safe.

Measured on an H100 (64 sequences x 1024 tokens, 32 heads over 8 KV heads, D 128, bf16, one format
for the whole arena, 1 split): bf16 181 us, fp8 181 us, int8 194 us, int4 685 us, against 63 us for
triton_decode over a dense cache. A block of 16 tokens is one tile and its id, format code and data are
three dependent loads per iteration; int4 gathers bytes and scales per channel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptserve.kernels.attention.triton_decode import _merge_kernel
from adaptserve.kernels.attention.triton_kv_layout import (
    _MIN_ROWS,
    _block_regions,
    _check_arena,
    _layout_constants,
    supports,
    unsupported_reason,
)
from adaptserve.kernels.attention.triton_kv_write import write_kv_compressed
from adaptserve.kernels.triton_norm import round_to_dtype
from adaptserve.runner.kv_arena import KVArena

__all__ = ["decode_attention_compressed", "supports", "unsupported_reason", "write_kv_compressed"]

KERNEL_VERSION = 2


# ---- kernel -----------------------------------------------------------------------------------------


@triton.jit
def _dequantize_rows(
    data_base,
    scale_base,
    rows,
    valid,
    CODE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INT4_GROUP: tl.constexpr,
    NATIVE_DTYPE: tl.constexpr,
):
    """Rows `rows` [BS] (token * KVH + head) of a block's K or V region -> float32 [BS, D], as
    kv_quant.dequantize computes them; rows not `valid` read as zeros (their bytes may be stale)."""
    channels = tl.arange(0, HEAD_DIM)  # [D]
    mask = valid[:, None]  # [BS, 1]
    if CODE == 0:
        ptrs = data_base.to(tl.pointer_type(NATIVE_DTYPE)) + rows[:, None] * HEAD_DIM + channels[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    elif CODE == 4:
        ptrs = data_base + rows[:, None] * (HEAD_DIM // 2) + channels[None, :] // 2  # [BS, D] bytes
        packed = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
        codes = ((packed >> ((channels[None, :] % 2) * 4)) & 0xF).to(tl.float32)  # even channel: low nibble
        pair_ptrs = scale_base.to(tl.pointer_type(tl.float16)) + rows[:, None] * (2 * HEAD_DIM // INT4_GROUP)
        pair_ptrs += 2 * (channels[None, :] // INT4_GROUP)  # [BS, D]: each channel's (scale, min)
        scale = tl.load(pair_ptrs, mask=mask, other=0.0).to(tl.float32)
        low = tl.load(pair_ptrs + 1, mask=mask, other=0.0).to(tl.float32)
        x = codes * scale + low
    else:
        ptrs = data_base + rows[:, None] * HEAD_DIM + channels[None, :]  # [BS, D] bytes
        if CODE == 1:
            data = tl.load(ptrs, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            data = tl.load(ptrs.to(tl.pointer_type(tl.int8)), mask=mask, other=0).to(tl.float32)
        scale = tl.load(scale_base.to(tl.pointer_type(tl.float16)) + rows, mask=valid, other=0.0)  # [BS]
        x = data * scale.to(tl.float32)[:, None]
    return x


@triton.jit
def _dequantize_key_channels(data_base, scale_base, rows, head, valid, HEAD_DIM: tl.constexpr):
    """int4k keys: rows `rows` [BS] of a block's K region, with the block's (scale, min) per channel of
    KV head `head` -> float32 [BS, D], as kv_quant.dequantize_key_blocks; rows not `valid` read as 0."""
    channels = tl.arange(0, HEAD_DIM)  # [D]
    mask = valid[:, None]  # [BS, 1]
    ptrs = data_base + rows[:, None] * (HEAD_DIM // 2) + channels[None, :] // 2  # [BS, D] bytes
    packed = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    codes = ((packed >> ((channels[None, :] % 2) * 4)) & 0xF).to(tl.float32)  # even channel: low nibble
    scale_ptrs = scale_base.to(tl.pointer_type(tl.float16)) + head * (2 * HEAD_DIM) + channels  # [D]
    scale = tl.load(scale_ptrs).to(tl.float32)  # [D] the head's D scales ...
    low = tl.load(scale_ptrs + HEAD_DIM).to(tl.float32)  # [D] ... then its D minimums
    return tl.where(mask, codes * scale[None, :] + low[None, :], 0.0)


@triton.jit
def _read_block(
    chunk_base,
    index,
    rows,
    head,
    valid,
    CODE: tl.constexpr,
    FORMATS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INT4_GROUP: tl.constexpr,
    NATIVE_DTYPE: tl.constexpr,
):
    """K and V rows `rows` [BS] (KV head `head`) of block `index` of a chunk in format CODE -> float32
    [BS, D] each. int4k (3): keys per channel, values as int4 (4)."""
    k_data, v_data, k_scales, v_scales = _block_regions(chunk_base, index, CODE, FORMATS)
    if CODE == 3:
        k = _dequantize_key_channels(k_data, k_scales, rows, head, valid, HEAD_DIM)
        v = _dequantize_rows(v_data, v_scales, rows, valid, 4, HEAD_DIM, INT4_GROUP, NATIVE_DTYPE)
    else:
        k = _dequantize_rows(k_data, k_scales, rows, valid, CODE, HEAD_DIM, INT4_GROUP, NATIVE_DTYPE)
        v = _dequantize_rows(v_data, v_scales, rows, valid, CODE, HEAD_DIM, INT4_GROUP, NATIVE_DTYPE)
    return k, v


@triton.jit
def _decode_kernel(
    q_ptr,
    bytes_ptr,
    chunk_formats_ptr,
    block_table_ptr,
    context_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    chunk_bytes,
    stride_qn,
    stride_qh,
    stride_on,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    INT4_GROUP: tl.constexpr,
    MAX_BLOCKS_PER_CHUNK: tl.constexpr,
    NATIVE_DTYPE: tl.constexpr,
    FORMATS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_SIZE)
    heads = kv_head * GROUP + offs_g  # [G_PAD]
    row_valid = offs_g < GROUP  # [G_PAD]
    rows = offs_n * NUM_KV_HEADS + kv_head  # [BS] this head's rows in every block's regions

    q = tl.load(
        q_ptr + seq * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )  # [G_PAD, D]
    dtype = q_ptr.dtype.element_ty  # the dequantized K/V are rounded to it, as read_blocks(ids, q.dtype)
    if UPCAST:
        q = q.to(tl.float32)

    # this split's blocks: an even share of the sequence's blocks, possibly none
    context_len = tl.load(context_lens_ptr + seq)
    num_blocks = tl.cdiv(context_len, BLOCK_SIZE)
    blocks_per_split = tl.cdiv(num_blocks, NUM_SPLITS)
    block_begin = split * blocks_per_split
    block_end = tl.minimum(block_begin + blocks_per_split, num_blocks)
    block_table_row = block_table_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # running softmax denominator
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)  # running numerator
    for b in range(block_begin, block_end):
        block_id = tl.load(block_table_row + b).to(tl.int64)
        chunk = block_id // MAX_BLOCKS_PER_CHUNK
        index = block_id % MAX_BLOCKS_PER_CHUNK
        code = tl.load(chunk_formats_ptr + chunk)
        base = bytes_ptr + chunk * chunk_bytes
        valid = b * BLOCK_SIZE + offs_n < context_len  # [BS]
        if code == 0:
            k, v = _read_block(
                base, index, rows, kv_head, valid, 0, FORMATS, HEAD_DIM, INT4_GROUP, NATIVE_DTYPE
            )
        elif code == 1:
            k, v = _read_block(
                base, index, rows, kv_head, valid, 1, FORMATS, HEAD_DIM, INT4_GROUP, NATIVE_DTYPE
            )
        elif code == 2:
            k, v = _read_block(
                base, index, rows, kv_head, valid, 2, FORMATS, HEAD_DIM, INT4_GROUP, NATIVE_DTYPE
            )
        elif code == 3:
            k, v = _read_block(
                base, index, rows, kv_head, valid, 3, FORMATS, HEAD_DIM, INT4_GROUP, NATIVE_DTYPE
            )
        else:
            k, v = _read_block(
                base, index, rows, kv_head, valid, 4, FORMATS, HEAD_DIM, INT4_GROUP, NATIVE_DTYPE
            )
        if UPCAST:  # the interpreter: float32 arithmetic on the values the GPU's casts would give
            k = round_to_dtype(k, dtype)  # [BS, D]
            v = round_to_dtype(v, dtype)  # [BS, D]
        else:
            k = k.to(dtype)  # [BS, D]
            v = v.to(dtype)  # [BS, D]
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [G_PAD, BS]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        # every block in range holds a valid token, so m_new is finite and alpha = 0 on the first one
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # [G_PAD]
        alpha = tl.exp2(m_i - m_new)  # [G_PAD]
        p = tl.exp2(scores - m_new[:, None])  # [G_PAD, BS]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")  # [G_PAD, D]
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # no tokens: acc is 0 and so is the output
    o = acc / l_safe[:, None]  # [G_PAD, D]
    if NUM_SPLITS == 1:
        if UPCAST:
            o = round_to_dtype(o, dtype)  # the interpreter's cast to bf16 truncates
        out_ptrs = out_ptr + seq * stride_on + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, o.to(dtype), mask=row_valid[:, None])
    else:
        part_rows = (seq * num_heads + heads) * NUM_SPLITS + split  # [G_PAD] rows of [N * H * S]
        tl.store(part_out_ptr + part_rows[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_valid[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))  # [G_PAD]
        tl.store(part_lse_ptr + part_rows, lse, mask=row_valid)


# ---- launcher ---------------------------------------------------------------------------------------


def decode_attention_compressed(
    q: torch.Tensor,
    arena: KVArena,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    num_splits: int = 1,
    num_warps: int = 4,
) -> torch.Tensor:
    """Attention of one query token per sequence over its context in a compressed arena.

    q: [N, H, D] (H a multiple of the arena's KV heads); block_table: [N, MB] int32 block ids;
    context_lens: [N] int32 (0 = padded row, output zeros); out: [N, H, D] in q's dtype, allocated when
    None. Returns out. `num_splits` > 1 splits each context into that many runs of blocks (for few,
    long sequences). No host syncs: the launch can be captured in a CUDA graph.
    """
    _check_arena(arena)
    layout = arena.layout
    if q.dim() != 3 or q.shape[2] != layout.head_dim or q.shape[1] % layout.num_kv_heads or q.stride(2) != 1:
        raise ValueError(
            f"q must be [N, H, head_dim={layout.head_dim}] with H a multiple of num_kv_heads="
            f"{layout.num_kv_heads} and a contiguous last dimension; got {tuple(q.shape)}"
        )
    num_seqs, num_heads, head_dim = q.shape
    if block_table.dim() != 2 or block_table.shape[0] != num_seqs or block_table.stride(1) != 1:
        raise ValueError(f"block_table must be [N={num_seqs}, max_blocks] with contiguous rows")
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"context_lens must be [N={num_seqs}], got {tuple(context_lens.shape)}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [N, H, D]
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dimension")
    if num_seqs == 0:
        return out
    if num_splits == 1:
        part_out = part_lse = out  # unused: the kernel writes the output directly
    else:
        rows = (num_seqs, num_heads, num_splits)
        part_out = torch.empty(*rows, head_dim, dtype=torch.float32, device=q.device)  # [N, H, S, D]
        part_lse = torch.empty(rows, dtype=torch.float32, device=q.device)  # [N, H, S]

    group = num_heads // layout.num_kv_heads
    _decode_kernel[(num_seqs, layout.num_kv_heads, num_splits)](
        q,
        arena.bytes,
        arena.chunk_formats,
        block_table,
        context_lens,
        out,
        part_out,
        part_lse,
        scale * 1.4426950408889634,  # log2(e): the softmax runs on exp2
        arena.chunk_bytes,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        GROUP=group,
        GROUP_PAD=max(_MIN_ROWS, triton.next_power_of_2(group)),
        NUM_SPLITS=num_splits,
        UPCAST=not q.is_cuda,  # CPU tensors mean Triton's interpreter
        **_layout_constants(arena),
        num_warps=num_warps,
    )
    if num_splits > 1:
        _merge_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=1 if head_dim <= 64 else 2,
        )
    return out
