"""SiLU(gate) * up for the MLP: one Triton kernel on CUDA, torch elsewhere.

Both compute what PyTorch's `F.silu(gate) * up` computes: silu in float32 rounded to the model dtype,
then the product rounded to the model dtype (see triton_activation.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptserve.kernels.availability import triton_available


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate then up along the last dim) -> silu(gate) * up: [T, I]."""
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and triton_available():
        from adaptserve.kernels.triton_activation import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)  # [T, I] each
    return F.silu(gate) * up
