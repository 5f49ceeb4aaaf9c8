"""SiLU(gate) * up for the MLP: one Triton kernel on CUDA, torch elsewhere.

Both compute what PyTorch's `F.silu(gate) * up` computes: silu in float32 rounded to the model dtype,
then the product rounded to the model dtype (see triton_activation.py).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate then up along the last dim) -> silu(gate) * up: [T, I]."""
    if x.is_cuda and x.dtype != torch.float32 and x.dim() == 2 and x.stride(1) == 1 and _triton_available():
        from adaptserve.kernels.triton_activation import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)  # [T, I] each
    return F.silu(gate) * up
