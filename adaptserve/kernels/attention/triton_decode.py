"""Paged decode attention in Triton: one query token per sequence against its paged KV cache.

Split-KV (flash-decoding). The grid is (sequences, KV heads, splits). A program serves the G = H / KVH
query heads that share one KV head, so each K/V tile is read from memory once for the whole group; the
G query rows are padded to 16 for tl.dot. It walks its share of the context in tiles of `tile_n`
tokens, finding each token's cache slot through the block table (one read per tile when a tile lies
inside one page), with an online softmax in float32. With one split it writes the output directly;
with several, each split writes a normalised partial output and its log-sum-exp (base 2) to float32
scratch and a second small kernel merges them. The split ranges come from `context_lens` inside the
kernel, so one launch shape serves every batch of the same size (CUDA-graph capturable). A split with
no tokens writes lse = -inf; a row with context length 0 (padding) gets zeros.

On the CPU the kernels run under Triton's interpreter, whose bf16 arithmetic is broken: there the
loaded values are upcast to float32 at once. On the GPU the dots take the cache's dtype (bf16 tensor
cores) and accumulate in float32.

Measured on an H100 (graph replay over rotated caches, so neither L2 nor launch gaps flatter it): 64
sequences of 1024 tokens, 32 heads over 8 KV heads, D 128, bf16 (268 MB of K/V) take 94 us, 2.85 TB/s,
against 2.95 TB/s for a plain read-only torch.sum; one 8192-token sequence takes 19 us with 32 splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptserve.kernels.launch_resources import launcher, record_resources

KERNEL_VERSION = 1

# Launch variants worth trying on an H100 (num_splits is not here: choose_num_splits picks it per
# batch shape). tile_n <= block_size reads the block table once per tile, larger tiles once per token.
CONFIGS: list[dict] = [
    {"tile_n": 16, "num_warps": 2, "num_stages": 3},
    {"tile_n": 32, "num_warps": 2, "num_stages": 3},
    {"tile_n": 32, "num_warps": 4, "num_stages": 4},
    {"tile_n": 64, "num_warps": 4, "num_stages": 2},
    {"tile_n": 64, "num_warps": 4, "num_stages": 3},
    {"tile_n": 64, "num_warps": 4, "num_stages": 4},
    {"tile_n": 64, "num_warps": 8, "num_stages": 3},
    {"tile_n": 128, "num_warps": 4, "num_stages": 2},
    {"tile_n": 128, "num_warps": 8, "num_stages": 2},
    {"tile_n": 128, "num_warps": 8, "num_stages": 3},
]

MAX_SPLITS = 32  # H100, one 8k sequence, 8 KV heads: 16 splits 21 us, 32 splits 19 us, 64 splits 18 us
_MIN_TOKENS_PER_SPLIT = 64  # H100 at 1k tokens (decode_split-h100.json): batch 1 best at 16 splits
_MIN_GROUP_ROWS = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _tile_slots(
    block_table_row, tile_start, positions, valid, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr
):
    """Cache slots (int64) of the tile's tokens `positions` = tile_start + arange(TILE_N)."""
    if TILE_N <= BLOCK_SIZE:
        # both are powers of two and tiles start at multiples of TILE_N: the tile lies in one page
        block_id = tl.load(block_table_row + tile_start // BLOCK_SIZE).to(tl.int64)
        slots = block_id * BLOCK_SIZE + (tile_start % BLOCK_SIZE) + tl.arange(0, TILE_N)
    else:
        block_ids = tl.load(block_table_row + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slots = block_ids * BLOCK_SIZE + positions % BLOCK_SIZE
    return slots


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    context_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    stride_qn,
    stride_qh,
    stride_on,
    stride_oh,
    stride_bt,
    stride_slot,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, TILE_N)
    heads = kv_head * GROUP + offs_g  # [G_PAD]
    row_valid = offs_g < GROUP  # [G_PAD]

    q = tl.load(
        q_ptr + seq * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )  # [G_PAD, D]
    if UPCAST:
        q = q.to(tl.float32)

    # this split's tiles: an even share of the sequence's tiles, possibly none
    context_len = tl.load(context_lens_ptr + seq)
    num_tiles = tl.cdiv(context_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    block_table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head * HEAD_DIM
    v_head = v_cache_ptr + kv_head * HEAD_DIM

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # running softmax denominator
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)  # running numerator
    for tile in range(tile_begin, tile_end):
        tile_start = tile * TILE_N
        positions = tile_start + offs_n  # [TILE_N]
        valid = positions < context_len  # [TILE_N]
        slots = _tile_slots(block_table_row, tile_start, positions, valid, BLOCK_SIZE, TILE_N)
        kv_offsets = slots[:, None] * stride_slot + offs_d[None, :]  # [TILE_N, D]
        # masked: slots past the context may hold anything (stale or never-written values)
        k = tl.load(k_head + kv_offsets, mask=valid[:, None], other=0.0)  # [TILE_N, D]
        v = tl.load(v_head + kv_offsets, mask=valid[:, None], other=0.0)  # [TILE_N, D]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [G_PAD, TILE_N]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        # every tile in range holds a valid token, so m_new is finite and alpha = 0 on the first tile
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # [G_PAD]
        alpha = tl.exp2(m_i - m_new)  # [G_PAD]
        p = tl.exp2(scores - m_new[:, None])  # [G_PAD, TILE_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")  # [G_PAD, D]
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # no tokens: acc is 0 and so is the output
    o = acc / l_safe[:, None]  # [G_PAD, D]
    if NUM_SPLITS == 1:
        out_ptrs = out_ptr + seq * stride_on + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        part_rows = (seq * num_heads + heads) * NUM_SPLITS + split  # [G_PAD] rows of [N * H * S]
        tl.store(part_out_ptr + part_rows[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_valid[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))  # [G_PAD]
        tl.store(part_lse_ptr + part_rows, lse, mask=row_valid)


@triton.jit
def _merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_on,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    split_valid = offs_s < NUM_SPLITS  # [S_PAD]
    rows = (seq * tl.num_programs(1) + head) * NUM_SPLITS + offs_s  # [S_PAD]

    lse = tl.load(part_lse_ptr + rows, mask=split_valid, other=float("-inf"))  # [S_PAD]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (padded row): all weights become 0
    weights = tl.exp2(lse - m)  # [S_PAD]
    parts = tl.load(
        part_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=split_valid[:, None], other=0.0
    )
    denom = tl.sum(weights, 0)
    o = tl.sum(weights[:, None] * parts, 0) / tl.where(denom > 0, denom, 1.0)  # [D]
    tl.store(out_ptr + seq * stride_on + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    tile_n: int = 64,
    num_splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
    resources: dict | None = None,
    compile_only: bool = False,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    q: [N, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D] contiguous; block_table: [N, MB]
    int32; context_lens: [N] int32 (0 = padded row, output zeros). Returns out: [N, H, D] in q's dtype.
    Nothing here reads device values, so the launch can be captured in a CUDA graph.
    `compile_only` compiles the kernels this call would launch (Triton's JIT warmup) and launches
    nothing; given `out`, it allocates nothing either (safe off the engine thread).
    """
    _check_inputs(q, k_cache, v_cache, block_table, context_lens, tile_n, num_splits)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [N, H, D]
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dimension")
    if num_splits == 1:
        part_out = part_lse = out  # unused: the kernel writes the output directly
    elif compile_only:
        part_out = part_lse = torch.float32  # warmup takes a dtype for a tensor: no scratch to allocate
    else:
        rows = (num_seqs, num_heads, num_splits)
        part_out = torch.empty(*rows, head_dim, dtype=torch.float32, device=q.device)  # [N, H, S, D]
        part_lse = torch.empty(rows, dtype=torch.float32, device=q.device)  # [N, H, S]

    compiled = launcher(_decode_kernel, (num_seqs, num_kv_heads, num_splits), compile_only)(
        q,
        k_cache,
        v_cache,
        block_table,
        context_lens,
        out,
        part_out,
        part_lse,
        scale * 1.4426950408889634,  # log2(e): the softmax runs on exp2
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        k_cache.stride(1),
        GROUP=group,
        GROUP_PAD=max(_MIN_GROUP_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE_N=tile_n,
        NUM_SPLITS=num_splits,
        UPCAST=not q.is_cuda,  # CPU tensors mean Triton's interpreter
        num_warps=num_warps,
        num_stages=num_stages,
    )
    record_resources(compiled, resources, num_warps)
    if num_splits > 1:
        launcher(_merge_kernel, (num_seqs, num_heads), compile_only)(
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


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int = 132, tile_n: int = 64
) -> int:
    """Splits per (sequence, KV head): double them while the grid is under two programs per SM and
    each split keeps at least _MIN_TOKENS_PER_SPLIT tokens (whole tiles) of the longest context. Big
    batches and short contexts get 1; a power of two, at most MAX_SPLITS."""
    num_programs = max(1, num_seqs * num_kv_heads)
    num_tiles = triton.cdiv(max(max_context_len, 0), tile_n)
    min_tiles = max(1, _MIN_TOKENS_PER_SPLIT // tile_n)
    splits = 1
    while (
        splits * 2 <= MAX_SPLITS
        and num_programs * splits < 2 * num_sms
        and num_tiles >= splits * 2 * min_tiles
    ):
        splits *= 2
    return splits


def _check_inputs(q, k_cache, v_cache, block_table, context_lens, tile_n, num_splits) -> None:
    """Shape and layout checks (host metadata only: no device sync)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"q must be [N, H, D] and k_cache, v_cache [num_blocks, block_size, KVH, D]; got q "
            f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(
            f"need head_dim a power of two >= 16 matching the cache and num_heads a multiple of "
            f"num_kv_heads; got q {tuple(q.shape)}, cache {tuple(k_cache.shape)}"
        )
    if block_size & (block_size - 1) or tile_n & (tile_n - 1) or tile_n < 16:
        raise ValueError(
            f"block_size and tile_n must be powers of two, tile_n >= 16; got {block_size}, {tile_n}"
        )
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or q.stride(2) != 1:
        raise ValueError("k_cache and v_cache must be contiguous and q's last dimension contiguous")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"q and the caches must share a dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if block_table.shape[0] != num_seqs or context_lens.shape != (num_seqs,) or block_table.stride(1) != 1:
        raise ValueError(
            f"block_table must be [N, max_blocks] with contiguous rows and context_lens [N], N={num_seqs}; "
            f"got {tuple(block_table.shape)}, {tuple(context_lens.shape)}"
        )
