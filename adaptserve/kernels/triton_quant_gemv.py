"""Small-batch GEMV for quantized weights: x [M, K] @ dequantize(weight) [N, K]^T, for decode at M = 1..32.

At decode batch sizes a projection is bound by reading its weight once, so fewer weight bytes means a
faster projection. These kernels read the weight in its compressed form, dequantize it in registers
and accumulate in float32; activations stay in their own dtype (bfloat16, float16 or float32):

- fp8 weight-only (`Fp8Weight`): 1 byte per weight, half of bfloat16's. y[m, n] = scale[n] *
  sum_k x[m, k] * float(w[n, k]); the per-channel scale multiplies the float32 sum once at the end.
  Unlike `fp8_linear`'s scaled_mm path, the activations are not rounded to e4m3, so only the
  weight's rounding remains: this is *more* accurate than W8A8, not less.
- int4 W4A16 (`Int4Weight`): half a byte per weight plus a scale and a zero point per group.
  y = x @ ((q - zero) * scale)^T, with (q - zero) * scale computed in float32 exactly as
  `dequantize_int4` computes it.

The layout follows triton_gemv.py: each program owns BLOCK_N output columns (BLOCK_N weight rows) and
streams its K range in BLOCK_K tiles; all rows of the batch that fit one program (BLOCK_M, M rounded
up to a power of two) share each weight tile, so the weight is read once for the whole small batch.
The inner product runs on the CUDA cores (`use_dot=False`: [BLOCK_M, BLOCK_N, BLOCK_K] products summed
along K, for M <= FMA_MAX_ROWS) or on the tensor cores (`use_dot=True`, BLOCK_M >= 16, the weight
tile converted to x's dtype first: every e4m3 value is exact in bfloat16 and float16, and an int4
weight rounds to what `dequantize_int4(q, x.dtype)` gives, the weight `int4_linear`'s reference path
multiplies with). `split_k` > 1 splits K over a second grid dimension; float32 partial sums are added
in a fixed order by triton_gemv's `reduce_split_k` (deterministic, no atomics, no host syncs).

int4 tiles: BLOCK_K columns are BLOCK_K / 2 bytes per row, loaded as [BLOCK_N, groups in the tile,
bytes per group] so that each group's scale and zero are loaded once and broadcast over its codes.
Low nibbles (even columns) and high nibbles (odd columns) are dequantized separately and multiplied
with x's even and odd columns, so codes never need interleaving. A code q becomes a float by reading
the bits 0x4B000000 | q as float32 (that is 2^23 + q, exactly) and subtracting 2^23: integer-to-float
conversion instructions run at a fraction of the rate of float arithmetic on NVIDIA GPUs, and at two
codes per byte they would cap int4 below memory bandwidth.

Numerics: float32 accumulation, the bias added in float32, one rounding to x's dtype at the end
(`round_to_dtype`: the interpreter's bfloat16 arithmetic is broken, so under it tiles are upcast to
float32 and dots are IEEE float32, as in triton_gemv.py).

A config with "folded": True runs triton_int4_gemv.py's kernel instead: int32 words, the zero point and
scale applied per group rather than per code (for the CUDA-core rows; see its docstring).

Launch configs and `pick_config` (the ones scripts/quant_gemv_bench.py measured fastest on an H200)
live in quant_gemv_configs.py (docs/benchmarks/quant_gemv-h200.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptserve.kernels.launch_resources import record_resources
from adaptserve.kernels.quant.fp8 import FP8_DTYPE, Fp8Weight
from adaptserve.kernels.quant.int4 import Int4Weight
from adaptserve.kernels.quant_gemv_configs import block_rows, pick_config
from adaptserve.kernels.triton_gemv import reduce_split_k
from adaptserve.kernels.triton_norm import round_to_dtype

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _accumulate(acc, x, w, USE_DOT: tl.constexpr, IEEE_DOT: tl.constexpr):
    """acc [BM, BN] + x [BM, BK] @ w [BN, BK]^T, w dequantized (or float8, which converts exactly)."""
    if USE_DOT:
        if IEEE_DOT:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)  # [BM, BN]
    else:
        products = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]  # [BM, BN, BK]
        acc += tl.sum(products, axis=2)
    return acc


@triton.jit
def _store_tile(
    acc, rows, cols, num_rows, out_features, bias_ptr, out_ptr, stride_om, HAS_BIAS, WRITE_PARTIAL
):
    """Store acc [BM, BN]: float32 partial sums, or with the bias added and rounded once to out's dtype."""
    out_mask = (rows[:, None] < num_rows) & (cols[None, :] < out_features)  # [BM, BN]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]  # [BM, BN]
    if WRITE_PARTIAL:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < out_features, other=0.0).to(tl.float32)[None, :]
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptrs, round_to_dtype(acc, dtype).to(dtype), mask=out_mask)


@triton.jit(do_not_specialize=["num_rows"])
def _fp8_gemv_kernel(
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
    weight_ptr,
    scale_ptr,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    USE_DOT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    # rows and columns past the end load a valid one instead (no masks on the weight stream); their
    # results are dropped at the store
    load_rows = tl.minimum(rows, num_rows - 1)  # [BM]
    load_cols = tl.minimum(cols, out_features - 1).to(tl.int64)  # [BN]
    ks = pid_k * k_per_split + tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + load_rows[:, None] * stride_xm + ks[None, :] * stride_xk  # [BM, BK]
    w_ptrs = weight_ptr + load_cols[:, None] * stride_wn + ks[None, :]  # [BN, BK] float8

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)  # [BM, BK]
            w = tl.load(w_ptrs)  # [BN, BK]
        else:
            k_mask = (ks + k0 < in_features)[None, :]  # [1, BK]
            x = tl.load(x_ptrs, mask=k_mask, other=0.0)
            w = tl.load(w_ptrs, mask=k_mask, other=0.0)
        acc = _accumulate(acc, x, w, USE_DOT, IEEE_DOT)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K

    acc *= tl.load(scale_ptr + load_cols).to(tl.float32)[None, :]  # [BM, BN]; linear, so fine per split
    out_ptr += pid_k * stride_split  # with split_k > 1, this split's [M, N] slice of the partial sums
    _store_tile(
        acc, rows, cols, num_rows, out_features, bias_ptr, out_ptr, stride_om, HAS_BIAS, WRITE_PARTIAL
    )


@triton.jit
def _codes_to_float(codes):
    """4-bit codes (any integer type) -> float32, exactly, without a conversion instruction."""
    return (codes.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # 2^23 + q - 2^23


@triton.jit(do_not_specialize=["num_rows"])
def _int4_gemv_kernel(
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
    packed_ptr,
    scales_ptr,
    zeros_ptr,
    stride_pn,
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
    SUB_K: tl.constexpr,  # columns of one group within a tile: min(BLOCK_K, GROUP_SIZE)
):
    TILE_GROUPS: tl.constexpr = BLOCK_K // SUB_K
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    load_rows = tl.minimum(rows, num_rows - 1)  # [BM]
    load_cols = tl.minimum(cols, out_features - 1).to(tl.int64)  # [BN]
    k_start = pid_k * k_per_split
    even_ks = k_start + 2 * tl.arange(0, BLOCK_K // 2)  # [BK/2] the tile's even columns
    x_ptrs = x_ptr + load_rows[:, None] * stride_xm + even_ks[None, :] * stride_xk  # [BM, BK/2]
    tile_groups = tl.arange(0, TILE_GROUPS)  # [TG]
    tile_bytes = tile_groups[:, None] * (SUB_K // 2) + tl.arange(0, SUB_K // 2)[None, :]  # [TG, SUB_K/2]
    p_ptrs = packed_ptr + load_cols[:, None, None] * stride_pn + (k_start // 2 + tile_bytes)[None, :, :]
    # p_ptrs: [BN, TG, SUB_K/2], two codes per byte

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        group_starts = k_start + k0 + tile_groups * SUB_K  # [TG] first column of each group in the tile
        groups = group_starts // GROUP_SIZE  # [TG]
        s_ptrs = scales_ptr + load_cols[:, None] * stride_sn + groups[None, :]  # [BN, TG]
        z_ptrs = zeros_ptr + load_cols[:, None] * stride_zn + groups[None, :]  # [BN, TG]
        if EVEN_K:
            x_even = tl.load(x_ptrs)  # [BM, BK/2]
            x_odd = tl.load(x_ptrs + stride_xk)  # [BM, BK/2]
            packed = tl.load(p_ptrs)  # [BN, TG, SUB_K/2]
            scales = tl.load(s_ptrs)  # [BN, TG]
            zeros = tl.load(z_ptrs)  # [BN, TG]
        else:
            # K is a multiple of GROUP_SIZE and tiles start on SUB_K boundaries: a group is all in or all out
            in_k = group_starts < in_features  # [TG]
            x_mask = (even_ks + k0 < in_features)[None, :]  # [1, BK/2]
            x_even = tl.load(x_ptrs, mask=x_mask, other=0.0)
            x_odd = tl.load(x_ptrs + stride_xk, mask=x_mask, other=0.0)
            packed = tl.load(p_ptrs, mask=in_k[None, :, None], other=0)
            scales = tl.load(s_ptrs, mask=in_k[None, :], other=0.0)
            zeros = tl.load(z_ptrs, mask=in_k[None, :], other=0.0)
        scales = scales.to(tl.float32)[:, :, None]  # [BN, TG, 1]
        zeros = zeros.to(tl.float32)[:, :, None]  # [BN, TG, 1]
        w_even = (_codes_to_float(packed & 0xF) - zeros) * scales  # [BN, TG, SUB_K/2]
        w_odd = (_codes_to_float(packed >> 4) - zeros) * scales  # [BN, TG, SUB_K/2]
        acc = _accumulate(acc, x_even, tl.reshape(w_even, (BLOCK_N, BLOCK_K // 2)), USE_DOT, IEEE_DOT)
        acc = _accumulate(acc, x_odd, tl.reshape(w_odd, (BLOCK_N, BLOCK_K // 2)), USE_DOT, IEEE_DOT)
        x_ptrs += BLOCK_K * stride_xk
        p_ptrs += BLOCK_K // 2

    out_ptr += pid_k * stride_split  # with split_k > 1, this split's [M, N] slice of the partial sums
    _store_tile(
        acc, rows, cols, num_rows, out_features, bias_ptr, out_ptr, stride_om, HAS_BIAS, WRITE_PARTIAL
    )


def fp8_gemv(
    x: torch.Tensor,
    w: Fp8Weight,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
    resources: dict | None = None,
) -> torch.Tensor:
    """x: [M, K] -> x @ dequantize_fp8(w).T + bias: [M, N] in x.dtype, activations not quantized.

    Meant for small M (1..32); correct for any. `config`: one of CONFIGS["fp8"] (None: `pick_config`).
    `resources`, when a dict, receives the main kernel's registers, spills, shared memory and warps.
    No host syncs: safe inside CUDA-graph capture.
    """
    _check_fp8(x, w, bias)
    weight = w.weight
    weight_args = (weight, w.scale, weight.stride(0))
    return _launch(_fp8_gemv_kernel, "fp8", x, weight.shape[0], weight_args, bias, config, resources, {})


def int4_gemv(
    x: torch.Tensor,
    q: Int4Weight,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
    resources: dict | None = None,
) -> torch.Tensor:
    """x: [M, K] -> x @ dequantize_int4(q).T + bias: [M, N] in x.dtype (W4A16).

    Needs a power-of-two group size. Otherwise as `fp8_gemv`, with `config` one of CONFIGS["int4"].
    """
    _check_int4(x, q, bias)
    config = pick_config("int4", x.shape[0], q.shape[0], x.shape[1]) if config is None else config
    constexprs = {"GROUP_SIZE": q.group_size, "SUB_K": min(config["block_k"], q.group_size)}
    kernel, codes = _int4_gemv_kernel, q.packed
    if config.get("folded") and _takes_words(q, constexprs["SUB_K"]):
        from adaptserve.kernels.triton_int4_gemv import _int4_folded_kernel

        kernel, codes = _int4_folded_kernel, q.packed.view(torch.int32)  # [N, K / 8], 8 codes a word
    weight_args = (codes, q.scales, q.zeros, codes.stride(0), q.scales.stride(0), q.zeros.stride(0))
    return _launch(kernel, "int4", x, q.shape[0], weight_args, bias, config, resources, constexprs)


def _takes_words(q: Int4Weight, sub_k: int) -> bool:
    """Whether the packed codes can be read as int32 words with whole words per group and tile
    (otherwise a "folded" config runs the byte kernel)."""
    packed = q.packed
    return (
        sub_k % 8 == 0
        and packed.stride(0) % 4 == 0
        and packed.storage_offset() % 4 == 0
        and packed.data_ptr() % 4 == 0
    )


def _launch(
    kernel,
    kind: str,
    x: torch.Tensor,
    out_features: int,
    weight_args: tuple,
    bias: torch.Tensor | None,
    config: dict | None,
    resources: dict | None,
    constexprs: dict,
) -> torch.Tensor:
    """Run `kernel` over its grid and, with split_k > 1, triton_gemv's reduction of the partial sums."""
    num_rows, in_features = x.shape
    out = x.new_empty(num_rows, out_features)  # [M, N]
    if num_rows == 0 or out_features == 0:
        return out
    config = pick_config(kind, num_rows, out_features, in_features) if config is None else config
    split_k, block_k = config["split_k"], config["block_k"]
    k_per_split = triton.cdiv(triton.cdiv(in_features, split_k), block_k) * block_k
    # split_k > 1: float32 partial sums, [split_k, M, N], reduced by a second kernel
    partial = x.new_empty(split_k, num_rows, out_features, dtype=torch.float32) if split_k > 1 else None
    target = out if partial is None else partial
    block_m = block_rows(config, num_rows)
    grid = (triton.cdiv(out_features, config["block_n"]), split_k, triton.cdiv(num_rows, block_m))
    compiled = kernel[grid](
        x,
        target,
        x if bias is None else bias,  # unused without a bias; any pointer will do
        num_rows,
        out_features,
        in_features,
        k_per_split,
        x.stride(0),
        x.stride(1),
        target.stride(-2),
        0 if partial is None else partial.stride(0),
        *weight_args,
        HAS_BIAS=bias is not None and partial is None,
        WRITE_PARTIAL=partial is not None,
        USE_DOT=config["use_dot"],
        # float32 inputs stay float32 (no TF32); CPU tensors mean the interpreter, whose bf16 is broken
        IEEE_DOT=x.dtype == torch.float32 or not x.is_cuda,
        EVEN_K=in_features % (split_k * block_k) == 0,
        BLOCK_M=block_m,
        BLOCK_N=config["block_n"],
        BLOCK_K=block_k,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
        **constexprs,
    )
    record_resources(compiled, resources, config["num_warps"])
    if partial is not None:
        reduce_split_k(partial, bias, out)
    return out


def _check_x_and_bias(x: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None):
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [M, {in_features}] to fit the weight, got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must be [{out_features}], got {tuple(bias.shape)}")


def _check_fp8(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None) -> None:
    """Shape and layout checks (metadata only, no device sync)."""
    weight = w.weight
    if weight.dim() != 2 or weight.dtype != FP8_DTYPE or weight.stride(1) != 1:
        raise ValueError(f"the weight must be [N, K] {FP8_DTYPE}, unit stride along K; got {weight.dtype}")
    if w.scale.shape != (weight.shape[0],):
        raise ValueError(f"the scale must be [{weight.shape[0]}], got {tuple(w.scale.shape)}")
    _check_x_and_bias(x, weight.shape[1], weight.shape[0], bias)


def _check_int4(x: torch.Tensor, q: Int4Weight, bias: torch.Tensor | None) -> None:
    """Shape and layout checks (metadata only, no device sync)."""
    out_features, in_features = q.shape
    group_size = q.group_size
    if group_size < 2 or group_size & (group_size - 1):
        raise ValueError(f"int4_gemv needs a power-of-two group_size (32, 64, 128, ...), got {group_size}")
    if in_features % group_size:
        raise ValueError(f"K={in_features} must be a multiple of group_size={group_size}")
    if q.packed.dtype != torch.uint8 or q.packed.stride(1) != 1:
        raise ValueError("the packed codes must be uint8 with unit stride along K")
    num_groups = in_features // group_size
    for name, t in (("scales", q.scales), ("zeros", q.zeros)):
        if t.shape != (out_features, num_groups) or t.stride(1) != 1:
            raise ValueError(f"{name} must be [{out_features}, {num_groups}], got {tuple(t.shape)}")
    _check_x_and_bias(x, in_features, out_features, bias)
