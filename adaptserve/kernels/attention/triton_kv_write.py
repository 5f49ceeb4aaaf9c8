"""Triton kernel that quantizes new K/V and writes them into a compressed KV cache (KVArena), each
token into its chunk's format, producing the bytes KVArena.write produces.

One program per (token, KV head). It quantizes the head vector as kv_quant.quantize does, bit for bit:
scales rounded to fp16 before the (IEEE) division, round half to even, clamp, int4 codes two a byte
with the even channel in the low nibble. Two steps avoid what differs between the GPU and Triton's
interpreter: rounding to an integer adds and subtracts 1.5 * 2**23 (exact ties-to-even in float32
arithmetic, with no libdevice `rint`, which the interpreter lacks), and fp8 e4m3 codes are built from
the float32 bits (the interpreter's float32 -> e4m3 cast rounds ties away from zero and mishandles
subnormals). A negative slot (a padded row) writes nothing, and so does a slot in an int4k block: that
format's key scales span the whole block, so its blocks are only written whole, by the runner's
requantization moves (KVArena.write_blocks); the block pool never hands one to new tokens, and
KVArena.write refuses one. Blocks are found as triton_kv_layout.py describes.

Measured on an H100: writing 4096 tokens takes about 25 us in every format.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptserve.kernels.attention.triton_kv_layout import _block_regions, _check_arena, _layout_constants
from adaptserve.kernels.kv_quant import _SMALLEST_SCALE, FP8_MAX
from adaptserve.kernels.triton_norm import round_to_dtype
from adaptserve.runner.kv_arena import KVArena

_FP8_MAX = tl.constexpr(FP8_MAX)
_SCALE_FLOOR = tl.constexpr(_SMALLEST_SCALE)
_ROUNDER = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + it - it rounds |x| < 2**22 to an integer, ties to even


# ---- rounding and quantization helpers -----------------------------------------------------------


@triton.jit
def _round_half_even(x):
    """float32 |x| < 2**22 -> the nearest integer (ties to even), as torch.round; float32."""
    return (x + _ROUNDER) - _ROUNDER


@triton.jit
def _round_clamp(x, low, high):
    """round(x).clamp(low, high), as kv_quant does for int8 and int4 codes; float32."""
    return tl.minimum(tl.maximum(_round_half_even(x), low), high)


@triton.jit
def _fp16_scale(scale):
    """The scale as it is stored (fp16), back in float32, never below the floor (kv_quant's)."""
    return tl.maximum(scale, _SCALE_FLOOR).to(tl.float16).to(tl.float32)


@triton.jit
def _e4m3_bits(x):
    """float32 x with |x| <= 448 -> its e4m3fn code (uint8), rounded to nearest, ties to even."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    # normal (|x| >= 2**-6): keep 3 mantissa bits with a ties-to-even carry, then rebias 127 -> 7
    normal = ((magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal: multiples of 2**-9 (a result of 8 is the smallest normal, whose code is also 8)
    subnormal = _round_half_even(tl.abs(x) * 512.0).to(tl.uint32)
    return (tl.where(magnitude >= 0x3C800000, normal, subnormal) | sign).to(tl.uint8)


# ---- kernel -----------------------------------------------------------------------------------------


@triton.jit
def _quantize_store(
    data_base,
    scale_base,
    row,
    channels,
    x_even,
    x_odd,
    CODE: tl.constexpr,
    NATIVE_DTYPE: tl.constexpr,
):
    """Quantize one head vector, given as its even and odd channels [NG, GS/2] in float32 (channel
    indices `channels` = the even ones), and store it as row `row` (token * KVH + head) of a block's
    data and scale regions (byte pointers)."""
    NUM_GROUPS: tl.constexpr = channels.shape[0]
    HEAD_DIM: tl.constexpr = 2 * channels.shape[0] * channels.shape[1]
    if CODE == 0:
        ptrs = data_base.to(tl.pointer_type(NATIVE_DTYPE)) + row * HEAD_DIM + channels  # [NG, GS/2]
        tl.store(ptrs, round_to_dtype(x_even, NATIVE_DTYPE).to(NATIVE_DTYPE))
        tl.store(ptrs + 1, round_to_dtype(x_odd, NATIVE_DTYPE).to(NATIVE_DTYPE))
    elif CODE == 4:
        # int4: per group of channels, min rounded to fp16 and scale = (max - min) / 15, codes 0..15
        low = tl.minimum(tl.min(x_even, 1), tl.min(x_odd, 1)).to(tl.float16).to(tl.float32)  # [NG]
        high = tl.maximum(tl.max(x_even, 1), tl.max(x_odd, 1))  # [NG]
        scale = _fp16_scale(tl.math.div_rn(high - low, 15.0))  # [NG]
        code_even = _round_clamp(tl.math.div_rn(x_even - low[:, None], scale[:, None]), 0.0, 15.0)
        code_odd = _round_clamp(tl.math.div_rn(x_odd - low[:, None], scale[:, None]), 0.0, 15.0)
        code_even = code_even.to(tl.uint8)  # [NG, GS/2]
        code_odd = code_odd.to(tl.uint8)  # [NG, GS/2]
        tl.store(data_base + row * (HEAD_DIM // 2) + channels // 2, code_even | (code_odd << 4))
        groups = tl.arange(0, NUM_GROUPS)  # [NG]
        scale_ptrs = scale_base.to(tl.pointer_type(tl.float16)) + row * (2 * NUM_GROUPS) + 2 * groups
        tl.store(scale_ptrs, scale.to(tl.float16))
        tl.store(scale_ptrs + 1, low.to(tl.float16))
    else:
        # fp8 (1) and int8 (2): one scale per head vector, amax / limit
        limit = _FP8_MAX if CODE == 1 else 127.0
        amax = tl.maximum(tl.max(tl.max(tl.abs(x_even), 1), 0), tl.max(tl.max(tl.abs(x_odd), 1), 0))
        scale = _fp16_scale(tl.math.div_rn(amax, limit))
        scaled_even = tl.math.div_rn(x_even, scale)  # [NG, GS/2]
        scaled_odd = tl.math.div_rn(x_odd, scale)  # [NG, GS/2]
        ptrs = data_base + row * HEAD_DIM + channels  # [NG, GS/2] bytes
        if CODE == 1:
            tl.store(ptrs, _e4m3_bits(tl.minimum(tl.maximum(scaled_even, -limit), limit)))
            tl.store(ptrs + 1, _e4m3_bits(tl.minimum(tl.maximum(scaled_odd, -limit), limit)))
        else:
            int8_ptrs = ptrs.to(tl.pointer_type(tl.int8))
            tl.store(int8_ptrs, _round_clamp(scaled_even, -127.0, 127.0).to(tl.int8))
            tl.store(int8_ptrs + 1, _round_clamp(scaled_odd, -127.0, 127.0).to(tl.int8))
        tl.store(scale_base.to(tl.pointer_type(tl.float16)) + row, scale.to(tl.float16))


@triton.jit
def _write_head(
    chunk_base,
    index,
    row,
    channels,
    k_head,
    v_head,
    CODE: tl.constexpr,
    FORMATS: tl.constexpr,
    NATIVE_DTYPE: tl.constexpr,
):
    """Quantize one head vector of K and of V (pointers to their channel 0) into row `row` of block
    `index` of a chunk in format CODE. `channels` [NG, GS/2]: the even channels, by int4 group."""
    k_data, v_data, k_scales, v_scales = _block_regions(chunk_base, index, CODE, FORMATS)
    k_even = tl.load(k_head + channels).to(tl.float32)  # [NG, GS/2]
    k_odd = tl.load(k_head + channels + 1).to(tl.float32)  # [NG, GS/2]
    _quantize_store(k_data, k_scales, row, channels, k_even, k_odd, CODE, NATIVE_DTYPE)
    v_even = tl.load(v_head + channels).to(tl.float32)  # [NG, GS/2]
    v_odd = tl.load(v_head + channels + 1).to(tl.float32)  # [NG, GS/2]
    _quantize_store(v_data, v_scales, row, channels, v_even, v_odd, CODE, NATIVE_DTYPE)


@triton.jit
def _write_kernel(
    k_ptr,
    v_ptr,
    slots_ptr,
    bytes_ptr,
    chunk_formats_ptr,
    chunk_bytes,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    INT4_GROUP: tl.constexpr,
    MAX_BLOCKS_PER_CHUNK: tl.constexpr,
    NATIVE_DTYPE: tl.constexpr,
    FORMATS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:  # a negative slot is a padded row
        block_id = slot // BLOCK_SIZE
        chunk = block_id // MAX_BLOCKS_PER_CHUNK
        index = block_id % MAX_BLOCKS_PER_CHUNK
        code = tl.load(chunk_formats_ptr + chunk)
        row = (slot % BLOCK_SIZE) * NUM_KV_HEADS + head  # the (token, head) row of the block's regions
        base = bytes_ptr + chunk * chunk_bytes
        # the head vector as pairs of channels (2c, 2c + 1), grouped as int4 groups
        groups = tl.arange(0, HEAD_DIM // INT4_GROUP)  # [NG]
        pairs = tl.arange(0, INT4_GROUP // 2)  # [GS/2]
        channels = groups[:, None] * INT4_GROUP + 2 * pairs[None, :]  # [NG, GS/2] even channels
        k_head = k_ptr + token * stride_kt + head * stride_kh
        v_head = v_ptr + token * stride_vt + head * stride_vh
        if code == 0:
            _write_head(base, index, row, channels, k_head, v_head, 0, FORMATS, NATIVE_DTYPE)
        elif code == 1:
            _write_head(base, index, row, channels, k_head, v_head, 1, FORMATS, NATIVE_DTYPE)
        elif code == 2:
            _write_head(base, index, row, channels, k_head, v_head, 2, FORMATS, NATIVE_DTYPE)
        elif code == 4:
            _write_head(base, index, row, channels, k_head, v_head, 4, FORMATS, NATIVE_DTYPE)
        # code 3 (int4k) is written only as whole blocks (KVArena.write_blocks): nothing here


# ---- launcher ---------------------------------------------------------------------------------------


def write_kv_compressed(arena: KVArena, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Quantize k, v [T, KVH, D] into their slots [T] (block_id * block_size + offset; negative = skip),
    each in its chunk's format, writing the bytes KVArena.write writes. k and v may be strided views
    with a contiguous last dimension. No host syncs: safe inside CUDA-graph capture."""
    _check_arena(arena)
    layout = arena.layout
    expected = (slots.shape[0], layout.num_kv_heads, layout.head_dim)
    if k.shape != expected or v.shape != expected or slots.dim() != 1:
        raise ValueError(
            f"k and v must be [T, num_kv_heads, head_dim] = {expected} for slots [T]; got "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, slots {tuple(slots.shape)}"
        )
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("k and v need a contiguous last dimension")
    if slots.shape[0] == 0:
        return
    _write_kernel[(slots.shape[0], layout.num_kv_heads)](
        k,
        v,
        slots,
        arena.bytes,
        arena.chunk_formats,
        arena.chunk_bytes,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        **_layout_constants(arena),
        num_warps=1,
    )
