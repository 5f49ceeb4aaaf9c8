"""Rotary embedding applied to q and k in place, fused with writing k and v into the paged KV cache.

One program handles one token: it looks up the token's cos/sin row once, rotates all of its query and
key heads (Hugging Face rotate-half layout, as `adaptserve.model.rope.apply_rope`), and stores the
rotated keys and the values at the token's cache slot. q, k, v and the caches are addressed through
their strides, so q, k and v may be views of the fused qkv projection output.

Numerics emulate the model's order of roundings in its dtype: cos and sin rounded to the model dtype,
each of x * cos and rotate_half(x) * sin rounded, then their sum rounded. A product of two bfloat16
(or float16) values is exact in float32, so every rounding is the one PyTorch does and the results are
bit-identical to `apply_rope`. The kernel is compiled without floating-point contraction so that no
product escapes its rounding in a fused multiply-add; float32 then does the same operations as PyTorch.
Rounding to bfloat16 goes through `round_to_dtype` (see triton_norm.py: the interpreter truncates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptserve.kernels.launch_resources import record_resources
from adaptserve.kernels.triton_norm import round_to_dtype

KERNEL_VERSION = 1

# launch variants worth timing on an H100; each dict is keyword arguments of `rope_and_write_kv`
CONFIGS: list[dict] = [{"num_warps": num_warps} for num_warps in (1, 2, 4, 8)]


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_head,
    stride_dim,
    num_heads,
    cos_lo,
    cos_hi,
    sin_lo,
    sin_hi,
    half,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate one token's heads in place; returns the rotated halves (float32, model-dtype values)."""
    dtype = x_ptr.dtype.element_ty
    heads = tl.arange(0, BLOCK_HEADS)  # [BH]
    dims = tl.arange(0, BLOCK_HALF)  # [BD]
    mask = (heads[:, None] < num_heads) & (dims[None, :] < half)  # [BH, BD]
    lo_ptrs = x_ptr + heads[:, None] * stride_head + dims[None, :] * stride_dim  # [BH, BD]
    hi_ptrs = lo_ptrs + half * stride_dim  # [BH, BD]
    x_lo = tl.load(lo_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BH, BD]
    x_hi = tl.load(hi_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BH, BD]
    # rotate_half(x) = [-x_hi, x_lo]; round each product, then the sum, as the model's dtype does
    out_lo = round_to_dtype(
        round_to_dtype(x_lo * cos_lo[None, :], dtype) - round_to_dtype(x_hi * sin_lo[None, :], dtype), dtype
    )
    out_hi = round_to_dtype(
        round_to_dtype(x_hi * cos_hi[None, :], dtype) + round_to_dtype(x_lo * sin_hi[None, :], dtype), dtype
    )
    tl.store(lo_ptrs, out_lo.to(dtype), mask=mask)
    tl.store(hi_ptrs, out_hi.to(dtype), mask=mask)
    return out_lo, out_hi


@triton.jit
def _rope_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    num_heads,
    num_kv_heads,
    half,
    block_size,
    stride_q_token,
    stride_q_head,
    stride_q_dim,
    stride_k_token,
    stride_k_head,
    stride_k_dim,
    stride_v_token,
    stride_v_head,
    stride_v_dim,
    stride_table,
    stride_kc_block,
    stride_kc_offset,
    stride_kc_head,
    stride_kc_dim,
    stride_vc_block,
    stride_vc_offset,
    stride_vc_head,
    stride_vc_dim,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dtype = q_ptr.dtype.element_ty
    dims = tl.arange(0, BLOCK_HALF)  # [BD]
    dim_mask = dims < half
    table_row = tl.load(positions_ptr + token) * stride_table
    # the model rounds cos and sin to its dtype before multiplying
    cos_lo = round_to_dtype(tl.load(cos_ptr + table_row + dims, mask=dim_mask, other=0.0), dtype)  # [BD]
    cos_hi = round_to_dtype(tl.load(cos_ptr + table_row + half + dims, mask=dim_mask, other=0.0), dtype)
    sin_lo = round_to_dtype(tl.load(sin_ptr + table_row + dims, mask=dim_mask, other=0.0), dtype)  # [BD]
    sin_hi = round_to_dtype(tl.load(sin_ptr + table_row + half + dims, mask=dim_mask, other=0.0), dtype)

    _rotate_heads(
        q_ptr + token * stride_q_token,
        stride_q_head,
        stride_q_dim,
        num_heads,
        cos_lo,
        cos_hi,
        sin_lo,
        sin_hi,
        half,
        BLOCK_HEADS,
        BLOCK_HALF,
    )
    k_lo, k_hi = _rotate_heads(
        k_ptr + token * stride_k_token,
        stride_k_head,
        stride_k_dim,
        num_kv_heads,
        cos_lo,
        cos_hi,
        sin_lo,
        sin_hi,
        half,
        BLOCK_KV_HEADS,
        BLOCK_HALF,
    )

    # cache write; a negative slot marks a padded row that must not touch the cache. It masks out every
    # head (rather than and-ing a scalar into the mask, which Triton's interpreter rejects).
    slot = tl.load(slot_mapping_ptr + token)
    heads_to_write = tl.where(slot >= 0, num_kv_heads, 0)
    kv_heads = tl.arange(0, BLOCK_KV_HEADS)  # [BKV]
    mask = (kv_heads[:, None] < heads_to_write) & dim_mask[None, :]  # [BKV, BD]
    block, offset = slot // block_size, slot % block_size
    k_cache_ptrs = (
        k_cache_ptr
        + block * stride_kc_block
        + offset * stride_kc_offset
        + kv_heads[:, None] * stride_kc_head
        + dims[None, :] * stride_kc_dim
    )  # [BKV, BD]
    cache_dtype = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptrs, k_lo.to(cache_dtype), mask=mask)
    tl.store(k_cache_ptrs + half * stride_kc_dim, k_hi.to(cache_dtype), mask=mask)

    v_ptrs = v_ptr + token * stride_v_token + kv_heads[:, None] * stride_v_head + dims[None, :] * stride_v_dim
    v_cache_ptrs = (
        v_cache_ptr
        + block * stride_vc_block
        + offset * stride_vc_offset
        + kv_heads[:, None] * stride_vc_head
        + dims[None, :] * stride_vc_dim
    )  # [BKV, BD]
    for part in tl.static_range(2):  # the low and the high half of the head dim
        v_half = tl.load(v_ptrs + part * half * stride_v_dim, mask=mask, other=0.0)  # [BKV, BD]
        tl.store(
            v_cache_ptrs + part * half * stride_vc_dim, v_half.to(v_cache_ptr.dtype.element_ty), mask=mask
        )


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    num_warps: int = 4,
    resources: dict | None = None,
) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place and write k, v into the paged caches.

    v: [T, KVH, D]. q, k, v may be strided views (e.g. of the fused qkv output). cos_table, sin_table:
    [P, D] float32 (RotaryEmbedding's tables); positions: [T] int64. k_cache, v_cache:
    [num_blocks, block_size, KVH, D]; slot_mapping: [T] int64 slots block * block_size + offset, and a
    negative slot skips the cache write for that row. `resources`, when a dict, receives the compiled
    kernel's registers, spills, shared memory and warps. No host syncs: safe inside CUDA-graph capture.
    """
    _check_shapes(q, k, v, cos_table, sin_table, k_cache, v_cache)
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    num_kv_heads, half = k.shape[1], head_dim // 2
    compiled = _rope_kv_kernel[(num_tokens,)](
        q,
        k,
        v,
        cos_table,
        sin_table,
        positions,
        k_cache,
        v_cache,
        slot_mapping,
        num_heads,
        num_kv_heads,
        half,
        k_cache.shape[1],
        *q.stride(),
        *k.stride(),
        *v.stride(),
        cos_table.stride(0),
        *k_cache.stride(),
        *v_cache.stride(),
        BLOCK_HEADS=triton.next_power_of_2(num_heads),
        BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=num_warps,
        # a fused multiply-add would skip the model's rounding of each product (float16 products fold
        # into half-precision fma.rn.f16 otherwise)
        enable_fp_fusion=False,
    )
    record_resources(compiled, resources, num_warps)


def _check_shapes(q, k, v, cos_table, sin_table, k_cache, v_cache) -> None:
    """Shape and layout checks (metadata only, no device sync)."""
    num_tokens, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit [T, heads, D]"
        )
    if cos_table.shape[1] != head_dim or cos_table.stride() != sin_table.stride() or cos_table.stride(1) != 1:
        raise ValueError(
            f"cos/sin tables must be [P, {head_dim}] with unit stride, got {tuple(cos_table.shape)}"
        )
    expected = (k.shape[1], head_dim)
    if tuple(k_cache.shape[2:]) != expected or tuple(v_cache.shape[2:]) != expected:
        raise ValueError(f"KV caches must be [blocks, block_size, {expected[0]}, {head_dim}]")
