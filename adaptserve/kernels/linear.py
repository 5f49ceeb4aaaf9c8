"""Dense projections, with the fastest formulation per device, dtype and row count.

On CPU, PyTorch's bfloat16 matrix multiply (oneDNN) is slow for a single row: `torch.mv` reads the
bfloat16 weights about twice as fast, which makes batch-1 decoding with bfloat16 weights memory-bound
as it should be. On CUDA, a few rows go to our Triton GEMV where it beats cuBLAS on the H100
(`gemv_row_limit`); everything else goes to `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptserve.kernels.availability import triton_available

# Measured on the H100 (docs/benchmarks/gemv-smollm2-{float32,bfloat16}-h100.json, gemv-h100.json):
# - float32: cuBLAS's kernels for 2-16 rows cost 1.5-3.6x its one-row kernel on SmolLM2's narrow
#   projections, the Triton GEMV's do not; on gate_up (3072 outputs) cuBLAS catches up past 4 rows;
# - bfloat16: from 3 rows on cuBLAS is as fast;
# - short and wide (SmolLM2's LM head, 576 -> 49152): cuBLAS is faster at every row count.
FLOAT32_ROW_LIMITS = ((2048, 16), (4096, 4))  # (most out_features, most rows), first match
HALF_ROW_LIMIT = 2
SHORT_K, WIDE_N = 2048, 4096


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K], weight: [N, K] -> [M, N]."""
    if x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        out = torch.mv(weight, x[0])[None, :]  # [1, N]
        return out if bias is None else out + bias
    if _gemv_suits(x, weight) and x.shape[0] <= gemv_row_limit(x.dtype, *weight.shape):
        from adaptserve.kernels.triton_gemv import gemv

        return gemv(x, weight, bias)  # [M, N]
    return F.linear(x, weight, bias)


def gemv_row_limit(dtype: torch.dtype, out_features: int, in_features: int) -> int:
    """Most rows for which a CUDA projection [out_features, in_features] goes to the Triton GEMV
    (0: never)."""
    if in_features <= SHORT_K and out_features > WIDE_N:
        return 0
    if dtype == torch.float32:
        return next((rows for most, rows in FLOAT32_ROW_LIMITS if out_features <= most), 1)
    if dtype in (torch.bfloat16, torch.float16):
        return HALF_ROW_LIMIT
    return 0


def _gemv_suits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.is_cuda and weight.dtype == x.dtype and weight.stride(1) == 1 and triton_available()
