"""Dense projections, with the fastest formulation per device, dtype and row count.

On CPU, PyTorch's bfloat16 matrix multiply (oneDNN) is slow for a single row: `torch.mv` reads the
bfloat16 weights about twice as fast, which makes batch-1 decoding with bfloat16 weights memory-bound
as it should be. On CUDA, a single row goes to our Triton GEMV, which reads the weights 7-19% faster
than cuBLAS on the H100 (docs/benchmarks/gemv-h100.json). Everything else goes to `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptserve.kernels.availability import triton_available


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K], weight: [N, K] -> [M, N]."""
    if x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        out = torch.mv(weight, x[0])[None, :]  # [1, N]
        return out if bias is None else out + bias
    if x.shape[0] == 1 and _gemv_suits(x, weight):
        from adaptserve.kernels.triton_gemv import gemv

        return gemv(x, weight, bias)  # [1, N]
    return F.linear(x, weight, bias)


def _gemv_suits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.stride(1) == 1
        and triton_available()
    )
