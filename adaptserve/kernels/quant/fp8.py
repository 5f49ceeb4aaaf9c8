"""FP8 (e4m3) linear layers: per-output-channel weight scales, dynamic per-token activation scales.

Both operands are scaled so that the largest magnitude of each row maps to 448, the largest finite
float8_e4m3fn value, then rounded to nearest-even by the float8 cast. e4m3 keeps 3 mantissa bits, so
values in the normal range (scaled magnitude >= 2^-6) carry a relative error of at most 2^-4.

`fp8_linear` with at most TRITON_GEMV_MAX_ROWS rows, as in decode, is weight-only: the activations
stay in their dtype, only the weight is float8, and the bias is added in float32 before one rounding.
On CUDA (compute capability >= 8.9) the Triton kernel `fp8_gemv` (triton_quant_gemv.py) does it,
bound by reading the weight, half of bfloat16's bytes; elsewhere `fp8_weight_only_linear` computes the
same product in float32, so a CPU run measures the numbers a GPU decode step serves. Weight-only is
more accurate than W8A8 since the activations are not rounded. Larger batches (prompt chunks) go to
`fp8_w8a8_linear`, which has two paths that see the same numbers:
- CUDA with compute capability >= 8.9 (Ada, Hopper) and K, N multiples of 16: `torch._scaled_mm`
  with row-wise scales, the float8 tensor cores accumulating in float32.
- everywhere else: an emulation that quantizes the activations with the same code, so it rounds to
  exactly the same float8 values, then multiplies the float8 values in float32 and applies both
  scales. Only the order of the float32 accumulation differs from the GPU path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from adaptserve.kernels.quant.small_batch import TRITON_GEMV_MAX_ROWS, takes_triton_gemv

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0


@dataclass(frozen=True, slots=True)
class Fp8Weight:
    """A linear weight in float8: w ≈ weight.float() * scale[:, None]."""

    weight: torch.Tensor  # [N, K] float8_e4m3fn, contiguous (its .t() is the column-major B operand)
    scale: torch.Tensor  # [N] float32, one scale per output channel

    @property
    def nbytes(self) -> int:
        return (
            self.weight.numel() * self.weight.element_size() + self.scale.numel() * self.scale.element_size()
        )


def _quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax scaling per row: t [..., K] -> (float8 [..., K], float32 scale [..., 1]); zero rows get 1."""
    t32 = t.float()  # [..., K]
    absmax = t32.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))  # [..., 1]
    # t / scale can land a rounding step above 448 for the absmax element; clamp so the cast saturates.
    q = (t32 / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # [..., K]
    return q, scale


def quantize_fp8_weight(w: torch.Tensor) -> Fp8Weight:
    """w: [N, K] float -> Fp8Weight with scale = absmax of each output row / 448 (1 for zero rows)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point tensor [N, K], got {w.dtype} {tuple(w.shape)}")
    q, scale = _quantize_rows(w)  # [N, K], [N, 1]
    return Fp8Weight(weight=q.contiguous(), scale=scale[:, 0].contiguous())


def quantize_fp8_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: x [M, K] -> (float8 [M, K], float32 scale [M, 1])."""
    return _quantize_rows(x)


def dequantize_fp8(w: Fp8Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight the float8 values stand for, [N, K] in `dtype` (computed in float32)."""
    return (w.weight.float() * w.scale[:, None]).to(dtype)  # [N, K]


@functools.cache
def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _can_use_scaled_mm(x: torch.Tensor, w: Fp8Weight) -> bool:
    """Whether `torch._scaled_mm` takes these operands: CUDA on sm_89+, K and N multiples of 16."""
    n, k = w.weight.shape
    return (
        x.is_cuda
        and _has_fp8_tensor_cores(x.device)
        and k % 16 == 0
        and n % 16 == 0
        and w.weight.is_contiguous()
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def _can_use_triton_gemv(x: torch.Tensor, w: Fp8Weight) -> bool:
    """Whether `fp8_gemv` takes these operands: few rows on sm_89+ (Triton's e4m3 type needs it)."""
    return takes_triton_gemv(x, w.weight) and _has_fp8_tensor_cores(x.device)


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x.dtype.

    Up to TRITON_GEMV_MAX_ROWS rows weight-only (`fp8_gemv` on CUDA, `fp8_weight_only_linear`
    elsewhere: x stays in its dtype; the bias is added in float32 before the one rounding); more rows
    `fp8_w8a8_linear`. See the module docstring.
    """
    lead_shape, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if _can_use_triton_gemv(x2, w):
        from adaptserve.kernels.triton_quant_gemv import fp8_gemv

        out = fp8_gemv(x2, w, bias)  # [M, N]
    elif x2.shape[0] <= TRITON_GEMV_MAX_ROWS:
        out = fp8_weight_only_linear(x2, w, bias)  # [M, N]
    else:
        out = fp8_w8a8_linear(x2, w, bias)  # [M, N]
    return out.reshape(*lead_shape, w.weight.shape[0])


def fp8_weight_only_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x.dtype: x @ (float8 weight * scale)^T in float32, as `fp8_gemv` computes
    it (the scale multiplies the float32 sum; the bias is added before the one rounding)."""
    acc = x.float() @ w.weight.float().t()  # [M, N]
    out = acc * w.scale[None, :]  # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def fp8_w8a8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x.dtype, with x quantized per token to float8 on the fly.

    The float8 GEMM runs on the tensor cores where `_can_use_scaled_mm` allows; elsewhere the
    emulation computes (x_fp8.float() @ w.weight.float().t()) * x_scale * w.scale in float32 from the
    same float8 values, so the two paths differ only in accumulation order. The bias is added after
    the cast to x.dtype on both paths.
    """
    x_fp8, x_scale = quantize_fp8_activation(x)  # [M, K] float8, [M, 1] float32
    if _can_use_scaled_mm(x, w):
        out = torch._scaled_mm(
            x_fp8,
            w.weight.t(),  # [K, N] column-major view of the contiguous [N, K] weight
            scale_a=x_scale,  # [M, 1]
            scale_b=w.scale[None, :],  # [1, N]
            out_dtype=x.dtype,
        )  # [M, N]
    else:
        acc = x_fp8.float() @ w.weight.float().t()  # [M, N] float32
        out = (acc * x_scale * w.scale[None, :]).to(x.dtype)  # [M, N]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out
