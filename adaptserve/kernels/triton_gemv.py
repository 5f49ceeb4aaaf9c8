"""Small-M matrix multiply (GEMV and its few-row cousins) for decode: x [M, K] @ weight[N, K]^T.

At M = 1..16 a projection is bound by reading its weight once, so the kernel is built around that read:
each program owns BLOCK_N output columns (BLOCK_N contiguous weight rows) and streams its K range in
BLOCK_K tiles, accumulating in float32. Two inner products are offered per config:

- `use_dot=False`: multiply and reduce on the CUDA cores ([BLOCK_M, BLOCK_N, BLOCK_K] products summed
  along K), with BLOCK_M = M rounded up to a power of two (at most FMA_MAX_ROWS; more rows take more
  programs, each reading the weight again, so these configs are for M <= FMA_MAX_ROWS, except at
  short K, where launch latency rather than the weight stream sets the time).
- `use_dot=True`: `tl.dot` on the tensor cores with BLOCK_M = 16 (its smallest tile), rows past M
  padded; wasteful in FLOPs, which a memory-bound kernel can spare.

`split_k` > 1 splits K across a second grid dimension so that a short N still fills the GPU: each split
writes float32 partial sums to a [split_k, M, N] buffer and a second kernel adds them in a fixed order
(deterministic, no atomics), adds the bias and rounds. The buffer's size depends only on shapes, so
the launch has no host syncs or data-dependent allocations and may be captured in a CUDA graph.

Numerics: float32 accumulation of exact products (bfloat16 and float16 products are exact in float32;
the tensor-core dot is asked for IEEE float32 when its inputs are float32), the bias added in float32,
one rounding to the output dtype at the end, as cuBLAS does. Sums are taken in another order than
cuBLAS's, so results agree to float32 rounding of the sum, not bit for bit.

Under Triton's interpreter (CPU tensors) bfloat16 arithmetic is broken, so loaded tiles are upcast to
float32 before the dot; the rounding at the end goes through `round_to_dtype` (see triton_norm.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptserve.kernels.launch_resources import record_resources
from adaptserve.kernels.triton_norm import round_to_dtype

KERNEL_VERSION = 1

FMA_MAX_ROWS = 4  # the CUDA-core configs hold [rows, BLOCK_N, BLOCK_K] products; past this, use dot
DOT_ROWS = 16  # tl.dot's smallest M tile
H100_SMS = 132

# launch variants worth timing on an H100, in order of preference; each dict is a `config` of `gemv`
CONFIGS: list[dict] = [
    # CUDA-core inner products, for M <= FMA_MAX_ROWS
    {"block_n": 16, "block_k": 512, "split_k": 1, "num_warps": 4, "num_stages": 1, "use_dot": False},
    {"block_n": 8, "block_k": 512, "split_k": 1, "num_warps": 4, "num_stages": 1, "use_dot": False},
    {"block_n": 4, "block_k": 1024, "split_k": 1, "num_warps": 4, "num_stages": 1, "use_dot": False},
    {"block_n": 16, "block_k": 256, "split_k": 2, "num_warps": 4, "num_stages": 3, "use_dot": False},
    {"block_n": 32, "block_k": 256, "split_k": 4, "num_warps": 8, "num_stages": 1, "use_dot": False},
    # tensor-core inner products, any M
    {"block_n": 16, "block_k": 512, "split_k": 1, "num_warps": 4, "num_stages": 3, "use_dot": True},
    {"block_n": 32, "block_k": 256, "split_k": 1, "num_warps": 4, "num_stages": 3, "use_dot": True},
    {"block_n": 64, "block_k": 128, "split_k": 1, "num_warps": 4, "num_stages": 4, "use_dot": True},
    {"block_n": 32, "block_k": 256, "split_k": 4, "num_warps": 4, "num_stages": 3, "use_dot": True},
    {"block_n": 64, "block_k": 256, "split_k": 4, "num_warps": 4, "num_stages": 3, "use_dot": True},
    # more CUDA-core shapes for one or two rows (after the first measurement: narrow, long tiles win)
    {"block_n": 2, "block_k": 2048, "split_k": 1, "num_warps": 4, "num_stages": 1, "use_dot": False},
    {"block_n": 4, "block_k": 2048, "split_k": 1, "num_warps": 8, "num_stages": 1, "use_dot": False},
    {"block_n": 8, "block_k": 1024, "split_k": 1, "num_warps": 8, "num_stages": 1, "use_dot": False},
    {"block_n": 4, "block_k": 512, "split_k": 1, "num_warps": 2, "num_stages": 1, "use_dot": False},
    {"block_n": 4, "block_k": 1024, "split_k": 1, "num_warps": 4, "num_stages": 2, "use_dot": False},
    {"block_n": 2, "block_k": 1024, "split_k": 1, "num_warps": 2, "num_stages": 1, "use_dot": False},
    # CUDA-core tiles of up to 8 rows ("block_m"), for a verify step's 5-9 rows at short K, where a
    # 4-row tile reads the weight twice (unmeasured: no pick uses them until gemv_bench has timed them)
    {
        "block_n": 4,
        "block_k": 512,
        "split_k": 1,
        "num_warps": 4,
        "num_stages": 1,
        "use_dot": False,
        "block_m": 8,
    },
    {
        "block_n": 2,
        "block_k": 1024,
        "split_k": 1,
        "num_warps": 4,
        "num_stages": 1,
        "use_dot": False,
        "block_m": 8,
    },
    {
        "block_n": 4,
        "block_k": 256,
        "split_k": 1,
        "num_warps": 4,
        "num_stages": 2,
        "use_dot": False,
        "block_m": 8,
    },
]


def configs_for(num_rows: int) -> list[dict]:
    """The CONFIGS that suit `num_rows` rows (all of them are correct for any row count)."""
    return [c for c in CONFIGS if c["use_dot"] or num_rows <= fma_rows(c)]


def fma_rows(config: dict) -> int:
    """Rows one program of a CUDA-core config multiplies (FMA_MAX_ROWS unless it says `block_m`)."""
    return config.get("block_m", FMA_MAX_ROWS)


def num_programs(config: dict, num_rows: int, out_features: int) -> int:
    """Programs of the main kernel's grid."""
    block_m = _block_rows(config, num_rows)
    return triton.cdiv(out_features, config["block_n"]) * config["split_k"] * triton.cdiv(num_rows, block_m)


# fastest or within 0.5% of it at M = 1 on every Llama-8B projection on the H100 (gemv-h100.json)
MEASURED_SINGLE_ROW_CONFIG = CONFIGS[10]

# Short K (SmolLM2's projections, K 576 and 1536; gemv-smollm2-*-h100.json): the launch, not the weight
# stream, sets the time, so CUDA-core configs stay fastest past FMA_MAX_ROWS (each 4 rows re-read a
# weight that sits in L2). Each pick is the fastest or within 6 % of it at 1-16 rows on the H100, in
# float32 and at the row counts where bfloat16 goes to this kernel at all (kernels/linear.py).
SHORT_K_CONFIGS = {  # (most in_features, most rows) -> config, first match
    (1024, 16): CONFIGS[2],  # fma n4 k1024 w4: one K tile
    (2048, FMA_MAX_ROWS): CONFIGS[10],  # fma n2 k2048 w4: one K tile
    (2048, 16): CONFIGS[13],  # fma n4 k512 w2: more rows, shorter tiles
}


def pick_config(num_rows: int, out_features: int, in_features: int, num_sms: int = H100_SMS) -> dict:
    """A config for x [num_rows, in_features] @ weight [out_features, in_features]^T.

    Short K (at most 2048) and at most 16 rows: SHORT_K_CONFIGS, measured on SmolLM2's shapes.
    Otherwise one and two rows take the measured best (block_n 2, block_k 2048: 1.07-1.19x cuBLAS's
    bandwidth at one row on every Llama-8B projection on the H100), and more rows the first suitable
    config, in CONFIGS order, whose grid gives every SM at least two programs (so that enough weight
    loads are in flight to saturate memory); when none does, the one with the most programs.
    """
    for (most_in_features, most_rows), config in SHORT_K_CONFIGS.items():
        if in_features <= most_in_features and num_rows <= most_rows:
            return config
    if num_rows <= 2:
        return MEASURED_SINGLE_ROW_CONFIG
    candidates = configs_for(num_rows)
    for config in candidates:
        if num_programs(config, num_rows, out_features) >= 2 * num_sms:
            return config
    return max(candidates, key=lambda c: num_programs(c, num_rows, out_features))


@triton.jit(do_not_specialize=["num_rows"])
def _gemv_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    num_rows,
    out_features,
    in_features,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_om,
    stride_split,
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
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    # rows and columns past the end load a valid row instead (no masks on the weight stream); their
    # results are dropped at the store
    load_rows = tl.minimum(rows, num_rows - 1)  # [BM]
    load_cols = tl.minimum(cols, out_features - 1).to(tl.int64)  # [BN]
    k_start = pid_k * k_per_split
    ks = k_start + tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + load_rows[:, None] * stride_xm + ks[None, :] * stride_xk  # [BM, BK]
    w_ptrs = weight_ptr + load_cols[:, None] * stride_wn + ks[None, :]  # [BN, BK]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)  # [BM, BK]
            w = tl.load(w_ptrs)  # [BN, BK]
        else:
            k_mask = (ks + k0 < in_features)[None, :]  # [1, BK]
            x = tl.load(x_ptrs, mask=k_mask, other=0.0)
            w = tl.load(w_ptrs, mask=k_mask, other=0.0)
        if USE_DOT:
            if IEEE_DOT:
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)  # [BM, BN]
        else:
            products = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]  # [BM, BN, BK]
            acc += tl.sum(products, axis=2)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K

    out_mask = (rows[:, None] < num_rows) & (cols[None, :] < out_features)  # [BM, BN]
    out_ptrs = out_ptr + pid_k * stride_split + rows[:, None] * stride_om + cols[None, :]  # [BM, BN]
    if WRITE_PARTIAL:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < out_features, other=0.0).to(tl.float32)[None, :]
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptrs, round_to_dtype(acc, dtype).to(dtype), mask=out_mask)


@triton.jit(do_not_specialize=["num_rows"])
def _split_k_reduce_kernel(
    partial_ptr,
    bias_ptr,
    out_ptr,
    num_rows,
    out_features,
    stride_split,
    stride_om,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < out_features
    partial_ptrs = partial_ptr + row * out_features + cols  # [BLOCK]
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):  # a fixed order: deterministic
        acc += tl.load(partial_ptrs + split * stride_split, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * stride_om + cols, round_to_dtype(acc, dtype).to(dtype), mask=mask)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    resources: dict | None = None,
) -> torch.Tensor:
    """x: [M, K], weight: [N, K] with unit stride along K, bias: [N] or None -> x @ weight.T + bias: [M, N].

    Meant for small M (1..16); correct for any. `config` is one of CONFIGS (None: `pick_config` by
    shape). `out` ([M, N], x.dtype, unit stride along N) receives the result when given. `resources`,
    when a dict, receives the main kernel's registers, spills, shared memory and warps. No host syncs:
    safe inside CUDA-graph capture.
    """
    _check_shapes(x, weight, bias)
    num_rows, in_features = x.shape
    out_features = weight.shape[0]
    out = x.new_empty(num_rows, out_features) if out is None else out
    if out.shape != (num_rows, out_features) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{num_rows}, {out_features}] {x.dtype} with unit stride along N")
    if num_rows == 0 or out_features == 0:
        return out
    config = pick_config(num_rows, out_features, in_features) if config is None else config
    split_k = config["split_k"]
    block_k = config["block_k"]
    k_per_split = triton.cdiv(triton.cdiv(in_features, split_k), block_k) * block_k
    # split_k > 1: float32 partial sums, [split_k, M, N], reduced by a second kernel
    partial = x.new_empty(split_k, num_rows, out_features, dtype=torch.float32) if split_k > 1 else None
    target = out if partial is None else partial
    block_m = _block_rows(config, num_rows)
    grid = (triton.cdiv(out_features, config["block_n"]), split_k, triton.cdiv(num_rows, block_m))
    compiled = _gemv_kernel[grid](
        x,
        weight,
        weight if bias is None else bias,  # unused without a bias; any pointer will do
        target,
        num_rows,
        out_features,
        in_features,
        k_per_split,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        target.stride(-2),
        0 if partial is None else partial.stride(0),
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
    )
    record_resources(compiled, resources, config["num_warps"])
    if partial is not None:
        reduce_split_k(partial, bias, out)
    return out


def reduce_split_k(partial: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [M, N] = the sum over splits of partial [S, M, N] (float32, in a fixed order) + bias,
    rounded once to out's dtype."""
    split_k, num_rows, out_features = partial.shape
    reduce_block = 1024
    _split_k_reduce_kernel[(triton.cdiv(out_features, reduce_block), num_rows)](
        partial,
        partial if bias is None else bias,  # unused without a bias; any pointer will do
        out,
        num_rows,
        out_features,
        partial.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        BLOCK=reduce_block,
        num_warps=4,
    )


def _block_rows(config: dict, num_rows: int) -> int:
    if config["use_dot"]:
        return DOT_ROWS
    return min(triton.next_power_of_2(num_rows), fma_rows(config))


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Shape and layout checks (metadata only, no device sync)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit [M, K] @ [N, K]^T")
    if weight.stride(1) != 1:
        raise ValueError("weight must have unit stride along K")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, weight and bias must share a dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
