"""RMSNorm, optionally fused with the residual add: one Triton kernel on CUDA, torch elsewhere.

Both compute what transformers computes for Llama models: the residual add in the model dtype, the
statistics in float32, the weight multiply in the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptserve.kernels.availability import triton_available


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [T, hidden] -> normed [T, hidden]; with `residual`, residual += x first (in place on CUDA)
    and (normed, residual) is returned."""
    if x.is_cuda and triton_available():
        from adaptserve.kernels.triton_norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps, residual)
    if residual is not None:
        residual = residual + x
        return _torch_rms_norm(residual, weight, eps), residual
    return _torch_rms_norm(x, weight, eps)


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    # statistics in float32, then scale in the model dtype (F.rms_norm is slow for bfloat16 on CPU)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)
