"""Quantized weight formats for linear layers: FP8 e4m3 (W8A8) and group-wise INT4 (W4A16)."""

from adaptserve.kernels.quant.fp8 import (
    Fp8Weight,
    dequantize_fp8,
    fp8_linear,
    quantize_fp8_activation,
    quantize_fp8_weight,
)
from adaptserve.kernels.quant.int4 import (
    Int4Weight,
    dequantize_int4,
    int4_linear,
    pack_int4,
    quantize_int4_weight,
    unpack_int4,
)

__all__ = [
    "Fp8Weight",
    "Int4Weight",
    "dequantize_fp8",
    "dequantize_int4",
    "fp8_linear",
    "int4_linear",
    "pack_int4",
    "quantize_fp8_activation",
    "quantize_fp8_weight",
    "quantize_int4_weight",
    "unpack_int4",
]
