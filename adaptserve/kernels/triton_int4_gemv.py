"""The folded int4 W4A16 GEMV (`int4_gemv` with a config whose "folded" is True): x [M, K] @
dequantize_int4(q) [N, K]^T on the CUDA cores for decode (M <= FMA_MAX_ROWS rows per program),
reading the packed codes as int32 words.

Why another kernel: `_int4_gemv_kernel` (triton_quant_gemv.py) dequantizes every code, (q - zero) *
scale, before multiplying it with x: 12.4 SASS instructions per 4-bit code in its inner loop (sm_90,
n4 k2048, compiled offline), so it is bound by instruction issue at 0.6-0.9 TB/s, slower than the
bfloat16 GEMV. This kernel takes the zero point and scale out of the inner loop. Per group of a row,

    sum_k x_k (q_k - z) s = s * sum_k x_k q_k - s * z * sum_k x_k,

so per code there remain: one mask-and-or (a LOP3), one float subtract and one FMA with x. sum_k x_k
is shared by the tile's BLOCK_N rows. The scale and zero are applied per word, not per code, into an
elementwise accumulator [BM, BN, groups in the tile, words] that is summed once after the K loop (no
cross-thread reduction inside it). Offline SASS: 7.0 instructions per code (n4 k2048), the remainder
being x's loads and conversion, the scale and zero loads and address arithmetic.

Codes to floats: the packed bytes are read as little-endian int32 words, nibble j of word w is column
8w + j. For j <= 4 (s = 4j) the nibble's bits s..s+3 lie inside float32's 23-bit mantissa, so
(word & (0xF << s)) | the exponent bits of 2^(23 - s), read as float32, is 2^(23 - s) + q exactly
(the mantissa's bit s is worth 2^(23 - s) * 2^(s - 23) = 1 there); minus 2^(23 - s) leaves q. Nibbles 5..7
take the same path from word >> 12 (one shift for three codes). No integer-to-float conversion
instruction (a fraction of the float rate) and no shift per code.

Numerics: x_k * q_k is exact in float32 for bfloat16/float16 x; sums are float32, in another order
than `dequantize_int4` then a product, so results agree to float32 rounding (tests: rtol 1e-5 against
float64 with float32 x).

Layout: words [BLOCK_N, TG, W] (TG groups in the tile, W words of a group in the tile); x's column
8w + j is loaded for each j as [BLOCK_M, TG, W] (stride 8), so no tensor has a nibble axis and the
eight products of a word stay in its thread. A group's words are visited in the order 0, W/2, 1,
W/2 + 1, ...: the same sum, but the word load then looks non-contiguous to Triton, which gives it the
same one-element-per-thread layout as x's strided loads; with a vectorized word load (its natural
layout) every nibble plane was moved through shared memory to x's layout, 8 barriers per tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from adaptserve.kernels.triton_quant_gemv import _store_tile


@triton.jit
def _nibble(words, high, j: tl.constexpr):
    """Nibble j of each int32 word as float32 q (exact), by exponent bits: see the module docstring."""
    if j < 5:
        shift: tl.constexpr = 4 * j
        src = words
    else:
        shift: tl.constexpr = 4 * (j - 3)
        src = high  # words >> 12: nibble j at bits 4j - 12
    # q << shift in the mantissa of 2^(23 - shift), whose biased exponent is 150 - shift
    bits = (src & (0xF << shift)) | ((150 - shift) << 23)
    return bits.to(tl.float32, bitcast=True) - (1 << (23 - shift))  # 2^(23 - shift) + q - 2^(23 - shift)


@triton.jit(do_not_specialize=["num_rows"])
def _int4_folded_kernel(
    x_ptr,
    out_ptr,
    bias_ptr,
    num_rows,
    out_features,
    in_features,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_om,
    stride_split,
    words_ptr,
    scales_ptr,
    zeros_ptr,
    stride_wn,  # in int32 words
    stride_sn,
    stride_zn,
    HAS_BIAS: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    USE_DOT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SUB_K: tl.constexpr,  # columns of one group within a tile: min(BLOCK_K, GROUP_SIZE), >= 8
):
    TILE_GROUPS: tl.constexpr = BLOCK_K // SUB_K
    WORDS: tl.constexpr = SUB_K // 8  # words of one group within a tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    load_rows = tl.minimum(rows, num_rows - 1)  # [BM]
    load_cols = tl.minimum(cols, out_features - 1).to(tl.int64)  # [BN]
    k_start = pid_k * k_per_split
    tile_groups = tl.arange(0, TILE_GROUPS)  # [TG]
    # the words of a group in the order 0, W/2, 1, W/2 + 1, ...: see the module docstring (layouts)
    group_words = tl.arange(0, WORDS)  # [W]
    group_words = (group_words % 2) * (WORDS // 2) + group_words // 2  # [W] a permutation
    tile_words = tile_groups[:, None] * WORDS + group_words[None, :]  # [TG, W]
    w_ptrs = words_ptr + load_cols[:, None, None] * stride_wn + (k_start // 8 + tile_words)[None, :, :]
    # w_ptrs: [BN, TG, W], eight codes per word
    word_ks = k_start + 8 * tile_words  # [TG, W] the column of each word's nibble 0
    x_ptrs = x_ptr + load_rows[:, None, None] * stride_xm + word_ks[None, :, :] * stride_xk  # [BM, TG, W]

    acc = tl.zeros((BLOCK_M, BLOCK_N, TILE_GROUPS, WORDS), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        group_starts = k_start + k0 + tile_groups * SUB_K  # [TG] first column of each group in the tile
        groups = group_starts // GROUP_SIZE  # [TG]
        s_ptrs = scales_ptr + load_cols[:, None] * stride_sn + groups[None, :]  # [BN, TG]
        z_ptrs = zeros_ptr + load_cols[:, None] * stride_zn + groups[None, :]  # [BN, TG]
        if EVEN_K:
            words = tl.load(w_ptrs)  # [BN, TG, W]
            scales = tl.load(s_ptrs).to(tl.float32)  # [BN, TG]
            zeros = tl.load(z_ptrs).to(tl.float32)  # [BN, TG]
        else:
            # K is a multiple of GROUP_SIZE and tiles start on SUB_K boundaries: a group is all in or out
            in_k = group_starts < in_features  # [TG]
            words = tl.load(w_ptrs, mask=in_k[None, :, None], other=0)
            scales = tl.load(s_ptrs, mask=in_k[None, :], other=0.0).to(tl.float32)
            zeros = tl.load(z_ptrs, mask=in_k[None, :], other=0.0).to(tl.float32)
        high = words >> 12  # [BN, TG, W] nibbles 5..7 at bits 8..19
        dots = tl.zeros((BLOCK_M, BLOCK_N, TILE_GROUPS, WORDS), dtype=tl.float32)
        x_sums = tl.zeros((BLOCK_M, TILE_GROUPS, WORDS), dtype=tl.float32)
        for j in tl.static_range(8):
            if EVEN_K:
                x = tl.load(x_ptrs + j * stride_xk).to(tl.float32)  # [BM, TG, W] columns 8w + j
            else:
                x = tl.load(x_ptrs + j * stride_xk, mask=(word_ks + k0 + j < in_features)[None], other=0.0)
                x = x.to(tl.float32)
            x_sums += x
            dots += x[:, None, :, :] * _nibble(words, high, j)[None, :, :, :]  # [BM, BN, TG, W]
        # per group: scale * sum x q - scale * zero * sum x, summed over the group's words after the loop
        acc += dots * scales[None, :, :, None]  # [BM, BN, TG, W]
        acc -= x_sums[:, None, :, :] * (scales * zeros)[None, :, :, None]
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K // 8

    acc = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BM, BN]
    out_ptr += pid_k * stride_split  # with split_k > 1, this split's [M, N] slice of the partial sums
    _store_tile(
        acc, rows, cols, num_rows, out_features, bias_ptr, out_ptr, stride_om, HAS_BIAS, WRITE_PARTIAL
    )
