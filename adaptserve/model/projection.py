"""A linear projection that can hold its weights in several formats at once and run in any of them.

`weight` (an nn.Linear parameter, the model's own dtype) is the native format and the reference.
`quantize(...)` adds lower-precision copies ("bf16", "fp8", "int4") next to it; `forward(x, precision)`
runs the projection in the format asked for, or the native one when that format is not held. Holding
several formats costs memory (int4 adds about 1/4 of the bf16 bytes, fp8 about 1/2) and buys the
freedom to switch precision from one decode step to the next without touching any weights.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptserve.config import WEIGHT_FORMATS
from adaptserve.kernels.linear import linear
from adaptserve.kernels.quant import (
    Fp8Weight,
    Int4Weight,
    fp8_linear,
    int4_linear,
    quantize_fp8_weight,
    quantize_int4_weight,
)

NATIVE = "native"  # the model's own weights and dtype


class Projection(nn.Linear):
    """nn.Linear plus optional extra formats of the same weights (plain tensors, not parameters, so
    state dicts and checkpoints see only the native weights)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.formats: dict[str, torch.Tensor | Fp8Weight | Int4Weight] = {}

    def quantize(self, formats: tuple[str, ...], int4_group_size: int = 128) -> None:
        """Add the given formats, made from the native weights."""
        for name in formats:
            if name not in WEIGHT_FORMATS:
                raise ValueError(f"unknown weight format {name!r}; known: {', '.join(WEIGHT_FORMATS)}")
            w = self.weight.detach()  # [N, K]
            if name == "bf16":
                self.formats[name] = w.to(torch.bfloat16)
            elif name == "fp8":
                self.formats[name] = quantize_fp8_weight(w)
            else:
                self.formats[name] = quantize_int4_weight(
                    w, group_size=_group_size(w.shape[1], int4_group_size)
                )

    def forward(self, x: torch.Tensor, precision: str = NATIVE) -> torch.Tensor:
        """x: [M, K] -> [M, N] in x's dtype, computed in `precision` if held, else natively."""
        held = self.formats.get(precision)
        if held is None:
            return linear(x, self.weight, self.bias)
        if isinstance(held, Fp8Weight):
            return fp8_linear(x, held, self.bias)
        if isinstance(held, Int4Weight):
            return int4_linear(x, held, self.bias)
        out = linear(x.to(held.dtype), held, None if self.bias is None else self.bias.to(held.dtype))
        return out.to(x.dtype)

    def format_bytes(self) -> dict[str, int]:
        """Bytes held per format, the native one included."""
        sizes = {NATIVE: self.weight.numel() * self.weight.element_size()}
        for name, held in self.formats.items():
            sizes[name] = (
                held.numel() * held.element_size() if isinstance(held, torch.Tensor) else held.nbytes
            )
        return sizes


def _group_size(in_features: int, wanted: int) -> int:
    """The int4 group size: `wanted` if it divides the row, else the largest even divisor below it."""
    for size in range(wanted, 1, -2):
        if in_features % size == 0:
            return size
    raise ValueError(f"no even int4 group size divides in_features={in_features}")


def quantize_model(model: nn.Module, formats: tuple[str, ...], int4_group_size: int = 128) -> dict[str, int]:
    """Add `formats` to every Projection of `model` (the LM head stays native, as weight-only
    quantization usually leaves it). Returns bytes held per format over the whole model."""
    totals: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, Projection):
            module.quantize(formats, int4_group_size)
            for name, size in module.format_bytes().items():
                totals[name] = totals.get(name, 0) + size
    return totals
