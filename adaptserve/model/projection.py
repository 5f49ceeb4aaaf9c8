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
            self.formats[name] = quantized_copy(self.weight.detach(), name, int4_group_size)

    def forward(self, x: torch.Tensor, precision: str = NATIVE) -> torch.Tensor:
        """x: [M, K] -> [M, N] in x's dtype, computed in `precision` if held, else natively."""
        return linear_in_format(x, self.weight, self.formats.get(precision), self.bias)

    def format_bytes(self) -> dict[str, int]:
        """Bytes held per format, the native one included."""
        return {NATIVE: self.weight.numel() * self.weight.element_size()} | held_bytes(self.formats)


def quantized_copy(
    w: torch.Tensor, name: str, int4_group_size: int = 128
) -> torch.Tensor | Fp8Weight | Int4Weight:
    """The [N, K] weight `w` in format `name` (bf16, fp8 or int4)."""
    if name not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {name!r}; known: {', '.join(WEIGHT_FORMATS)}")
    if name == "bf16":
        return w.to(torch.bfloat16)
    if name == "fp8":
        return quantize_fp8_weight(w)
    return quantize_int4_weight(w, group_size=_group_size(w.shape[1], int4_group_size))


def linear_in_format(
    x: torch.Tensor, weight: torch.Tensor, held: torch.Tensor | Fp8Weight | Int4Weight | None, bias=None
) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x's dtype with `held` (a quantized_copy of `weight`), or `weight` if None."""
    if held is None:
        return linear(x, weight, bias)
    if isinstance(held, Fp8Weight):
        return fp8_linear(x, held, bias)
    if isinstance(held, Int4Weight):
        return int4_linear(x, held, bias)
    out = linear(x.to(held.dtype), held, None if bias is None else bias.to(held.dtype))
    return out.to(x.dtype)


def held_bytes(formats: dict) -> dict[str, int]:
    """Bytes of each held copy."""
    return {
        name: held.numel() * held.element_size() if isinstance(held, torch.Tensor) else held.nbytes
        for name, held in formats.items()
    }


def _group_size(in_features: int, wanted: int) -> int:
    """The int4 group size: `wanted` if it divides the row, else the largest even divisor below it."""
    for size in range(wanted, 1, -2):
        if in_features % size == 0:
            return size
    raise ValueError(f"no even int4 group size divides in_features={in_features}")


def quantize_model(
    model: nn.Module, formats: tuple[str, ...], int4_group_size: int = 128, lm_head: bool = False
) -> dict[str, int]:
    """Add `formats` to every Projection of `model`, and with `lm_head` to the model's LM head too
    (`quantize_head`; by default it stays native). Returns bytes held per format over the whole
    model, the LM head's copies included."""
    totals: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, Projection):
            module.quantize(formats, int4_group_size)
            for name, size in module.format_bytes().items():
                totals[name] = totals.get(name, 0) + size
    if lm_head and formats:
        for name, size in held_bytes(model.quantize_head(formats, int4_group_size)).items():
            totals[name] = totals.get(name, 0) + size
    return totals
