"""INT4 W4A16 through PyTorch's own tinygemm kernel (`torch._weight_int4pack_mm`, the int4 path of
gpt-fast and torchao), for bfloat16 activations at small batches.

Why: our Triton int4 GEMV reads the packed codes at 650-810 GB/s on an H100 (quant_gemv-h100.json,
2026-12-07), so int4 decode of the 8B preset ran at 0.92x bf16 at batch 1 and 0.24x at batch 32.
tinygemm reads a tensor-core layout of the same codes with one wide load per lane and dequantizes
them inside the mma tiles.

Same weights, another layout and zero point:
- codes: tinygemm's packer takes [N, K / 2] bytes with the *even* column in the high nibble (our
  packed bytes have it in the low one, so the packer gets the unpacked codes), and lays them out as
  [N / 8, K / (16 * inner_k_tiles), 32, inner_k_tiles / 2] int32 for the m16n8k16 tensor-core
  tile. Its CPU twin takes the unpacked [N, K] int32 codes.
- zero point: tinygemm dequantizes w = (q - 8) * scale + zero_tg; ours is w = (q - zero) * scale,
  so zero_tg = (8 - zero) * scale, computed in float32 and stored, with the scale, as bfloat16
  [K / group_size, N, 2]. That one extra rounding of the zero is the only change to the weights
  (at most half a bfloat16 ulp of |(8 - zero) * scale| per group).

Limits (checked by `tinygemm_layout`): group size 32, 64, 128 or 256; K a multiple of 32 (two
k-tiles of 16 at least); N a multiple of 8 on a CUDA GPU of compute capability 8.0 or newer, of 16 on
the CPU. The packed copy sits next to the Int4Weight's own codes (the Triton kernels and the reference
path read those), about a quarter of the bfloat16 weight's bytes again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
# Up to this many rows int4_linear takes tinygemm for bfloat16 activations. tinygemm's tile is 16 rows
# and it re-reads the weight for every 16 rows, so past a few tiles dequantize + cuBLAS wins; the
# default is where scripts/quant_gemv_bench.py measures the cross-over. ADAPTSERVE_TINYGEMM_MAX_ROWS
# overrides it (0 turns tinygemm off: benchmarks compare the Triton kernels with it that way).
TINYGEMM_MAX_ROWS = int(os.environ.get("ADAPTSERVE_TINYGEMM_MAX_ROWS", "64"))


@dataclass(frozen=True, slots=True)
class TinygemmInt4:
    """An Int4Weight's codes in tinygemm's layout, with its scales and zero points."""

    packed: torch.Tensor  # CUDA: [N / 8, K / (16 * inner_k_tiles), 32, inner_k_tiles / 2] int32; CPU: its own
    scales_and_zeros: torch.Tensor  # [K / group_size, N, 2] bfloat16: scale, then (8 - zero) * scale
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))


def inner_k_tiles(in_features: int) -> int | None:
    """The most 16-column k-tiles per packed word group that divide K (8, 4 or 2), or None."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    return None


def tinygemm_layout(out_features: int, in_features: int, group_size: int, device: torch.device) -> int | None:
    """tinygemm's inner k-tiles for a [N, K] weight with this group size on `device`, or None when
    tinygemm cannot take it (see the module doc)."""
    if device.type == "cuda":
        kernel_here = hasattr(torch, "_weight_int4pack_mm") and torch.cuda.get_device_capability(device) >= (
            8,
            0,
        )
        rows_per_tile = 8
    else:
        kernel_here = device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu")
        rows_per_tile = 16
    if not kernel_here or out_features % rows_per_tile:
        return None
    if group_size not in TINYGEMM_GROUP_SIZES or in_features % group_size:
        return None
    return inner_k_tiles(in_features)


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Our per-group scale and zero point ([N, G] each, w = (q - zero) * scale) -> tinygemm's
    [G, N, 2] bfloat16 (scale, (8 - zero) * scale), for w = (q - 8) * scale + that."""
    scale = scales.float()  # [N, G]
    offset = (8.0 - zeros.float()) * scale  # [N, G]
    return torch.stack((scale, offset), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, N, 2]


def pack_tinygemm(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> TinygemmInt4 | None:
    """An Int4Weight's parts (codes [N, K] 0..15, unpacked; scales and zeros [N, G]) -> TinygemmInt4
    on their device, or None when tinygemm cannot take the shape there."""
    tiles = tinygemm_layout(codes.shape[0], codes.shape[1], group_size, codes.device)
    if tiles is None:
        return None
    codes = codes.to(torch.uint8)
    if codes.is_cuda:
        pairs = (codes[:, 0::2] << 4) | codes[:, 1::2]  # [N, K / 2]: the even column in the high nibble
        words = torch._convert_weight_to_int4pack(pairs.contiguous(), tiles)
    else:
        words = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    return TinygemmInt4(words, scales_and_zeros(scales, zeros), group_size)


def tinygemm_linear(x: torch.Tensor, t: TinygemmInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] bfloat16 -> [M, N] bfloat16 (tinygemm rounds its float32 sums to bfloat16 once; the
    bias is added after, in bfloat16, as F.linear's epilogue would)."""
    x = x.contiguous()
    if x.is_cuda:
        out = torch._weight_int4pack_mm(x, t.packed, t.group_size, t.scales_and_zeros)  # [M, N]
    else:
        out = torch._weight_int4pack_mm_for_cpu(x, t.packed, t.group_size, t.scales_and_zeros)  # [M, N]
    return out if bias is None else out + bias.to(out.dtype)
