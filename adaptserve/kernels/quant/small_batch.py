"""When a quantized projection takes the Triton small-batch GEMV (triton_quant_gemv.py) on CUDA.

Shared by fp8 and int4: few rows (decode), a float activation dtype, a weight whose rows are
contiguous, and Triton present. Each format adds its own condition (fp8: sm_89+; int4: a power-of-two
group size).
"""

from __future__ import annotations

import torch

from adaptserve.kernels.availability import triton_available

# Up to this many rows the kernels read the weight once for the whole batch. Measured on an H200
# (docs/benchmarks/quant_gemv-h200.json): at 32 rows fp8 weight-only takes 16-60 us against
# torch._scaled_mm's 38-67, and int4 110-406 us against dequantize + cuBLAS's 246-1510.
TRITON_GEMV_MAX_ROWS = 32


def takes_triton_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x: [M, K]; weight: the stored [N, ...] tensor (float8 codes or packed int4 bytes)."""
    return (
        x.is_cuda
        and 1 <= x.shape[0] <= TRITON_GEMV_MAX_ROWS
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and weight.stride(1) == 1
        and triton_available()
    )
