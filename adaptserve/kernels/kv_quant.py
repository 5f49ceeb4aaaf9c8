"""Quantize and dequantize K/V head vectors in each KV format (the torch reference; the Triton kernels
follow it bit for bit where they can). See engine/kv_cache/formats.py for the formats' scales.

x: [N, H, D] float -> (data [N, H, D'] in the format's storage dtype, scales [N, H, S] fp16), and back.
Scales are rounded to fp16 before dividing, so the stored scale is the one that was used.

int4k's keys are quantized per channel along a whole block's tokens (quantize_key_blocks: k
[N, bs, H, D] -> codes [N, bs, H, D/2] packed as int4's, scales [N, H, 2, D]: D scales, then D
minimums); its values are int4's, per token (`value_format`). `quantize` refuses int4k: a head vector
alone has no block to take per-channel scales over.
"""

from __future__ import annotations

import torch

from adaptserve.engine.kv_cache.formats import SCALE_DTYPE

FP8_MAX = 448.0  # largest finite e4m3 value
_SMALLEST_SCALE = 1e-6  # floor of a scale (an all-zero vector would divide by zero)
STORAGE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4k": torch.uint8, "int4": torch.uint8}


def quantize(x: torch.Tensor, name: str, group_size: int, native_dtype: torch.dtype):
    """x [N, H, D] -> (data, scales) of format `name` (scales is None for bf16, the native format)."""
    if name == "bf16":
        return x.to(native_dtype), None
    if name == "int4k":
        raise ValueError("int4k keys are quantized per block (quantize_key_blocks), never a token alone")
    xf = x.float()
    if name in ("fp8", "int8"):
        limit = FP8_MAX if name == "fp8" else 127.0
        scale = _fp16_scale(xf.abs().amax(dim=-1, keepdim=True) / limit)  # [N, H, 1]
        scaled = xf / scale
        if name == "fp8":
            return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale.to(SCALE_DTYPE)
        return scaled.round().clamp(-127, 127).to(torch.int8), scale.to(SCALE_DTYPE)
    if name == "int4":
        n, h, d = xf.shape
        groups = xf.view(n, h, d // group_size, group_size)  # [N, H, G, gs]
        low = groups.amin(dim=-1, keepdim=True).to(SCALE_DTYPE).float()  # [N, H, G, 1]
        scale = _fp16_scale((groups.amax(dim=-1, keepdim=True) - low) / 15.0)  # [N, H, G, 1]
        codes = ((groups - low) / scale).round().clamp(0, 15).to(torch.uint8).view(n, h, d)
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [N, H, D/2]
        scales = torch.cat([scale, low], dim=-1).view(n, h, -1).to(SCALE_DTYPE)  # [N, H, 2G]: scale, min
        return packed, scales
    raise ValueError(f"unknown KV format {name!r}")


def dequantize(data: torch.Tensor, scales: torch.Tensor | None, name: str, group_size: int, dtype):
    """(data, scales) of format `name` -> [N, H, D] in `dtype`."""
    if name == "bf16":
        return data.to(dtype)
    if name in ("fp8", "int8"):
        return (data.float() * scales.float()).to(dtype)
    if name == "int4":
        n, h, half = data.shape
        codes = torch.stack([data & 0xF, data >> 4], dim=-1).view(n, h, 2 * half).float()  # [N, H, D]
        groups = codes.view(n, h, -1, group_size)  # [N, H, G, gs]
        pairs = scales.float().view(n, h, -1, 2)  # [N, H, G, 2]
        return (groups * pairs[..., :1] + pairs[..., 1:]).view(n, h, 2 * half).to(dtype)
    raise ValueError(f"unknown KV format {name!r}")


def value_format(name: str) -> str:
    """The per-token format a block of format `name` stores its values in (int4k: int4)."""
    return "int4" if name == "int4k" else name


def quantize_key_blocks(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4k keys: k [N, bs, H, D] -> (codes [N, bs, H, D/2] uint8, two a byte with the even channel in
    the low nibble, scales [N, H, 2, D] fp16: per block, head and channel the scale, then the minimum),
    asymmetric over the block's tokens as int4 is over a group of channels."""
    kf = k.float()
    low = kf.amin(dim=1, keepdim=True).to(SCALE_DTYPE).float()  # [N, 1, H, D]
    scale = _fp16_scale((kf.amax(dim=1, keepdim=True) - low) / 15.0)  # [N, 1, H, D]
    codes = ((kf - low) / scale).round().clamp(0, 15).to(torch.uint8)  # [N, bs, H, D]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [N, bs, H, D/2]
    scales = torch.cat([scale, low], dim=1).transpose(1, 2).to(SCALE_DTYPE)  # [N, H, 2, D]
    return packed, scales.contiguous()


def dequantize_key_blocks(packed: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """(codes [N, bs, H, D/2], scales [N, H, 2, D]) of int4k keys -> [N, bs, H, D] in `dtype`."""
    n, bs, h, half = packed.shape
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(n, bs, h, 2 * half).float()  # [N, bs, H, D]
    pairs = scales.float().transpose(1, 2)  # [N, 2, H, D]
    return (codes * pairs[:, :1] + pairs[:, 1:]).to(dtype)


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as it will be stored (fp16), back in fp32, never zero."""
    return scale.clamp(min=_SMALLEST_SCALE).to(SCALE_DTYPE).float()
