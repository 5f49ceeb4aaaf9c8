"""RMSNorm in Triton, optionally fused with the residual add that precedes it in a decoder layer.

Numerics follow `adaptserve.model.llama.RMSNorm` step by step, each rounding done where the model does
it: the residual add rounded to the model dtype, the statistics in float32, the normalised row rounded
to the model dtype, then `weight * row` rounded once more. Only the order of the float32 sum of squares
and the float32 rsqrt differ from PyTorch, so a normalised value can land one rounding step (1 ulp of
the model dtype) away from the reference when it sits next to a rounding boundary; float32 agrees to a
few float32 ulps.

Rounding to bfloat16 is done with integer bit arithmetic (`round_to_dtype`) because Triton's
interpreter truncates on float32 -> bfloat16 casts; the bit trick rounds to nearest-even the same way
on the GPU and in the interpreter, so CPU tests check the GPU's arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaptserve.kernels.launch_resources import record_resources

KERNEL_VERSION = 1

# launch variants worth timing on an H100; each dict is keyword arguments of `rms_norm`
CONFIGS: list[dict] = [
    {"num_warps": num_warps, "rows_per_program": rows} for num_warps in (1, 2, 4, 8) for rows in (1, 2, 4)
]


@triton.jit
def round_to_dtype(x, dtype: tl.constexpr):
    """Round float32 `x` to the nearest `dtype` value (ties to even), returned as float32."""
    if dtype == tl.bfloat16:
        # add half a bfloat16 ulp (minus one when the kept last bit is 0: ties go to even), then drop
        # the low 16 bits; a carry into the exponent is the correct result (and inf stays inf; only
        # a NaN whose payload sits in the low 16 bits alone would turn into inf)
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    num_rows,
    hidden,
    stride_x,
    stride_residual,
    stride_out,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    IS_FP32: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    mask = (rows[:, None] < num_rows) & (cols[None, :] < hidden)  # [ROWS, BLOCK]
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + rows[:, None] * stride_residual + cols[None, :]  # [ROWS, BLOCK]
        residual = tl.load(residual_ptrs, mask=mask, other=0.0).to(tl.float32)  # [ROWS, BLOCK]
        x = round_to_dtype(x + residual, dtype)  # the model adds in its own dtype
        tl.store(residual_ptrs, x.to(dtype), mask=mask)
    mean_square = tl.sum(x * x, axis=1) / hidden  # [ROWS]
    normed = x * tl.math.rsqrt(mean_square + eps)[:, None]  # [ROWS, BLOCK]
    weight = tl.load(weight_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)  # [BLOCK]
    if IS_FP32:
        out = normed * weight[None, :]
    else:
        out = round_to_dtype(round_to_dtype(normed, dtype) * weight[None, :], dtype)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(dtype), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    num_warps: int = 4,
    rows_per_program: int = 1,
    out: torch.Tensor | None = None,
    resources: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [T, hidden] with unit stride along hidden; weight: [hidden] -> normalised [T, hidden] in x.dtype.

    weight is expected in x.dtype, as the model holds it (the product weight * row is rounded to x.dtype).

    With `residual` ([T, hidden], x.dtype): residual becomes residual + x in place (rounded to x.dtype)
    and the result is (norm(residual), residual). `out` receives the normalised rows when given.
    `resources`, when a dict, receives the compiled kernel's registers, spills, shared memory and warps.
    No host syncs: safe inside CUDA-graph capture.
    """
    num_rows, hidden = x.shape
    _check_rows(x, "x", hidden)
    if residual is not None:
        _check_rows(residual, "residual", hidden)
    out = torch.empty_like(x) if out is None else out
    _check_rows(out, "out", hidden)
    if num_rows > 0:
        _launch(x, weight, eps, residual, out, num_warps, rows_per_program, resources)
    return out if residual is None else (out, residual)


def _check_rows(t: torch.Tensor, name: str, hidden: int) -> None:
    if t.dim() != 2 or t.shape[1] != hidden or t.stride(1) != 1:
        raise ValueError(f"{name} must be [T, {hidden}] with unit stride along hidden, got {tuple(t.shape)}")


def _launch(x, weight, eps, residual, out, num_warps, rows_per_program, resources) -> None:
    num_rows, hidden = x.shape
    grid = (triton.cdiv(num_rows, rows_per_program),)
    compiled = _rms_norm_kernel[grid](
        x,
        x if residual is None else residual,  # unused without a residual; any pointer will do
        weight,
        out,
        num_rows,
        hidden,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        out.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        IS_FP32=x.dtype == torch.float32,
        ROWS=rows_per_program,
        BLOCK=triton.next_power_of_2(hidden),
        num_warps=num_warps,
    )
    record_resources(compiled, resources, num_warps)
