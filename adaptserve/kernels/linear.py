"""Dense projections, with the fastest formulation per device, dtype and row count.

On CPU, PyTorch's bfloat16 matrix multiply (oneDNN) is slow for a single row: `torch.mv` reads the
bfloat16 weights about twice as fast, which makes batch-1 decoding with bfloat16 weights memory-bound
as it should be. Everything else goes to `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K], weight: [N, K] -> [M, N]."""
    if x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        out = torch.mv(weight, x[0])[None, :]  # [1, N]
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)
