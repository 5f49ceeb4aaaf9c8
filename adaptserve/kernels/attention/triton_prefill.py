"""Paged causal attention for prefill (prompts, chunks of prompts, and mixed batches) in Triton.

Flash-attention-2 forward: each program owns one tile of query rows of one sequence and walks that
sequence's keys in tiles of `block_n`, keeping a running max and sum (fp32) so the scores are never
written out. K/V rows are gathered token by token through the block table, so `block_n` need not
match the page size.

GQA: the G = H // KVH query heads that share a KV head are packed into the M dimension of one
program (row m is query position m // G, head m % G), so each K/V tile is loaded once for all G
heads, the tile of a short query (a decode row, a small chunk) still fills G rows of the matrix
units, and the causal diagonal is crossed by fewer key tiles.

Causality: query row i of a sequence sits at absolute position context_len - query_len + i. Key
tiles that lie wholly at or below the tile's first position (the cached prefix and the part of the
chunk before the tile) run without a mask; only the few tiles that cross the diagonal are masked, and
tiles above the last position are never visited.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptserve.kernels.launch_resources import launcher, record_resources

KERNEL_VERSION = 2  # 2: float32 dots in full precision (they were TF32)

# Launch variants worth trying on an H100, best first for head_dim 128, bf16, 32/8 heads, page 16.
# Measured there (Triton 3.6), a 4096-token prompt | a 512-token chunk after 3584 cached, in TFLOP/s:
# m128 n128 w8 s3 355 | 300; m256 n64 w8 s2 348 | 163; m128 n64 w8 s3 330 | 265; m64 n64 w4 s3 339 | 292
# (torch's flash SDPA on contiguous K/V: 526). Small tiles win on chunks and mixed batches (more programs).
CONFIGS: list[dict] = [
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
    dict(block_m=256, block_n=64, num_warps=8, num_stages=2),
    dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=2),
    dict(block_m=128, block_n=64, num_warps=4, num_stages=3),
    dict(block_m=256, block_n=32, num_warps=8, num_stages=3),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=4),
    dict(block_m=64, block_n=32, num_warps=4, num_stages=4),
]

_LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(
    cache_ptr,
    block_table_row_ptr,
    cols,
    kv_head,
    dims,
    context_len,
    stride_block,
    stride_slot,
    stride_head,
    PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Gather the K or V rows of key positions `cols` through the block table -> [BLOCK_N, D]."""
    if MASKED:
        # a tile that crosses the diagonal may run past the context (and past the block table row)
        in_context = cols < context_len
        block_ids = tl.load(block_table_row_ptr + cols // PAGE_SIZE, mask=in_context, other=0)
    else:
        block_ids = tl.load(block_table_row_ptr + cols // PAGE_SIZE)
    row_offsets = block_ids.to(tl.int64) * stride_block + (cols % PAGE_SIZE) * stride_slot  # [BLOCK_N]
    ptrs = cache_ptr + row_offsets[:, None] + kv_head * stride_head + dims[None, :]  # [BLOCK_N, D]
    if MASKED:
        tile = tl.load(ptrs, mask=in_context[:, None], other=0.0)
    else:
        tile = tl.load(ptrs)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _attend_key_tiles(
    acc,
    row_max,
    row_sum,
    q,
    k_ptr,
    v_ptr,
    block_table_row_ptr,
    row_positions,
    kv_head,
    context_len,
    key_start,
    key_end,
    qk_scale,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """Online-softmax update of (acc, row_max, row_sum) over key positions [key_start, key_end).

    Maxima are kept in log2 units (qk_scale = scale * log2(e)) so the exponentials are exp2.
    """
    dims = tl.arange(0, HEAD_DIM)
    for start in range(key_start, key_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute key positions
        k = _load_kv_tile(
            k_ptr, block_table_row_ptr, cols, kv_head, dims, context_len,
            stride_kb, stride_ks, stride_kh, PAGE_SIZE, MASKED, UPCAST,
        )  # fmt: skip
        if IEEE_DOT:  # float32: full precision, as the decode kernels (tl.dot would take TF32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N] unscaled
        else:
            scores = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] unscaled
        if MASKED:
            causal = cols[None, :] <= row_positions[:, None]  # [BLOCK_M, BLOCK_N]
            scores = tl.where(causal, scores, float("-inf"))
        # scale only the row maxima, then fold the scale into the subtraction (one FMA per score)
        new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)  # [BLOCK_M]
        p = tl.math.exp2(scores * qk_scale - new_max[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2(row_max - new_max)  # [BLOCK_M] rescales what was summed so far
        row_sum = row_sum * alpha + tl.sum(p, 1)
        v = _load_kv_tile(
            v_ptr, block_table_row_ptr, cols, kv_head, dims, context_len,
            stride_vb, stride_vs, stride_vh, PAGE_SIZE, MASKED, UPCAST,
        )  # fmt: skip
        if IEEE_DOT:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")  # [BLOCK_M, D]
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # [BLOCK_M, D]
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    context_lens_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    QUERY_GROUP: tl.constexpr,  # G = H // KVH query heads per KV head, packed into the rows
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,  # float32 inputs: full-precision dots (tl.dot's default is TF32)
):
    # KV heads vary fastest and query tiles run last-first, so the heaviest tiles (most keys) of every
    # sequence and head start in the first wave and the light ones fill the tail.
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    tile = tl.num_programs(2) - 1 - tl.program_id(2)
    POSITIONS_PER_TILE: tl.constexpr = BLOCK_M // QUERY_GROUP

    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    first_pos = tile * POSITIONS_PER_TILE
    if first_pos >= query_len:  # past this sequence's queries (or a padded sequence)
        return
    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - query_len  # absolute position of query row 0

    rows = tl.arange(0, BLOCK_M)
    query_pos = first_pos + rows // QUERY_GROUP  # [BLOCK_M] position within this step's queries
    head = kv_head * QUERY_GROUP + rows % QUERY_GROUP  # [BLOCK_M]
    # when G does not divide BLOCK_M the last rows hold no whole position
    row_valid = (rows < POSITIONS_PER_TILE * QUERY_GROUP) & (query_pos < query_len)  # [BLOCK_M]
    dims = tl.arange(0, HEAD_DIM)

    q_rows = (query_start + query_pos).to(tl.int64) * stride_qt + head * stride_qh  # [BLOCK_M]
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_valid[:, None], other=0.0)  # [BLOCK_M, D]
    if UPCAST:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_positions = prefix_len + query_pos  # [BLOCK_M] absolute positions
    first_abs = prefix_len + first_pos
    last_abs = prefix_len + tl.minimum(first_pos + POSITIONS_PER_TILE, query_len) - 1
    # Key tiles ending at or before the first row's position are visible to every row: no mask.
    unmasked_end = (first_abs + 1) // BLOCK_N * BLOCK_N
    block_table_row_ptr = block_table_ptr + seq.to(tl.int64) * stride_bt
    acc, row_max, row_sum = _attend_key_tiles(
        acc, row_max, row_sum, q, k_ptr, v_ptr, block_table_row_ptr, row_positions, kv_head,
        context_len, 0, unmasked_end, qk_scale, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N, False, UPCAST, IEEE_DOT,
    )  # fmt: skip
    acc, row_max, row_sum = _attend_key_tiles(
        acc, row_max, row_sum, q, k_ptr, v_ptr, block_table_row_ptr, row_positions, kv_head,
        context_len, unmasked_end, last_abs + 1, qk_scale, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, HEAD_DIM, PAGE_SIZE, BLOCK_N, True, UPCAST, IEEE_DOT,
    )  # fmt: skip

    out = acc / row_sum[:, None]  # [BLOCK_M, D]; every valid row saw at least its own key
    out_rows = (query_start + query_pos).to(tl.int64) * stride_ot + head * stride_oh  # [BLOCK_M]
    out_ptrs = out_ptr + out_rows[:, None] + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    *,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
    resources: dict | None = None,
    compile_only: bool = False,
) -> torch.Tensor:
    """Causal attention of each sequence's query rows over its paged K/V -> [T, H, D] in q's dtype.

    q: [T, H, D]; sequence s owns rows query_start_loc[s]:query_start_loc[s + 1] (int32 [S + 1]).
    k_cache, v_cache: [num_blocks, page_size, KVH, D], already holding positions 0..context_lens[s]-1
    of every sequence (this step's K/V included); block_table: [S, max_blocks] int32.
    Query row i of sequence s sits at position context_lens[s] - query_len + i and sees keys up to it.
    max_query_len (host int) sizes the grid; rows of no sequence are left unwritten.
    No host syncs, so it can be captured in a CUDA graph. `resources`, when given, receives the
    compiled kernel's registers, spills, shared memory and warps (GPU only). `compile_only` compiles
    the kernel this call would launch (Triton's JIT warmup) and launches nothing; given `out`, it
    allocates nothing either (safe off the engine thread).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    _check_shapes(q, k_cache, v_cache, num_kv_heads, block_m, block_n)
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    num_seqs = context_lens.shape[0]
    if max_query_len <= 0 or num_seqs == 0 or num_tokens == 0:
        return out
    grid = (num_kv_heads, num_seqs, triton.cdiv(max_query_len, block_m // group))
    compiled = launcher(_paged_prefill_kernel, grid, compile_only)(
        q, k_cache, v_cache, out, block_table, query_start_loc, context_lens,
        scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        QUERY_GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        # Triton's interpreter (CPU tensors) mis-computes bfloat16 arithmetic and bf16 tl.dot
        UPCAST=q.device.type == "cpu",
        IEEE_DOT=q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    record_resources(compiled, resources, num_warps)
    return out


def _check_shapes(q, k_cache, v_cache, num_kv_heads, block_m, block_n) -> None:
    """Clear errors for shapes the kernel cannot take (its tiles need powers of two >= 16)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} vs q {tuple(q.shape)}"
        )
    if head_dim < 16 or not _is_pow2(head_dim):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_m < 16 or block_n < 16 or not (_is_pow2(block_m) and _is_pow2(block_n)):
        raise ValueError(f"block_m ({block_m}) and block_n ({block_n}) must be powers of two >= 16")
    if block_m < num_heads // num_kv_heads:
        raise ValueError(
            f"block_m ({block_m}) must hold one position of all {num_heads // num_kv_heads} heads"
        )
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
