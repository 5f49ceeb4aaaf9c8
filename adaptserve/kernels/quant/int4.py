"""INT4 weight-only quantization (W4A16): group-wise, asymmetric, with a least-squares refinement.

Each run of `group_size` consecutive input columns of an output row is one group with its own scale
and zero point: w ≈ (q - zero) * scale with q in 0..15. Two codes share a byte (low nibble = even
column). Scales and zero points are stored in the weight's dtype; all arithmetic is float32.

The quantizer starts from the min/max grid of each group (min -> code 0, max -> code 15) and then
alternates two exact minimisations of the group's squared reconstruction error, like Lloyd's
algorithm on a uniform grid:

1. codes fixed: the least-squares line w ≈ scale * q - scale * zero through the group's (q, w)
   pairs, in closed form; the scale is rounded to the storage dtype first and the intercept is then
   fitted for that rounded scale;
2. scale and zero fixed: the best code of each element is its nearest grid point, clamped to 0..15.

In exact arithmetic neither step can raise the error. Because the stored scale and zero are rounded
to the weight's dtype (bfloat16 has 8 mantissa bits), a group only takes a step when its error
actually drops, so the result is never worse than min/max, group by group; a group that stops
improving is at a fixed point and leaves the loop. The loop ends after `refine_steps` rounds or
when no group improves; `refine_steps=0` gives plain min/max. On normal weights 20 rounds lower the
squared error by 10-14% (group sizes 32-128). Caveat of bfloat16 storage: a group far from zero has
a large zero point, which bfloat16 rounds coarsely; LLM weight groups straddle zero, where
|zero| <= 15 rounds by at most 1/32 of a step.

`int4_linear` picks, in order:
- bfloat16 activations with at most TINYGEMM_MAX_ROWS rows and a weight that carries a tinygemm copy
  (quantized from bfloat16 weights in a shape tinygemm takes): PyTorch's tinygemm kernel
  (int4_tinygemm.py), on CUDA and on the CPU;
- on CUDA with at most TRITON_GEMV_MAX_ROWS rows, as in decode: the fused W4A16 Triton kernel
  `int4_gemv` (triton_quant_gemv.py), which reads the packed codes and dequantizes them in registers;
- else the whole dequantized weight (`int4_dequant_linear`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaptserve.kernels.quant import int4_tinygemm
from adaptserve.kernels.quant.int4_tinygemm import TinygemmInt4, pack_tinygemm, tinygemm_linear
from adaptserve.kernels.quant.small_batch import takes_triton_gemv

INT4_MAX = 15

# Rows are quantized in blocks of about this many elements: small blocks stay in the CPU caches
# during the refinement loop, large blocks keep the GPU busy with few kernel launches.
_BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 27}


@dataclass(frozen=True, slots=True)
class Int4Weight:
    """A [N, K] linear weight as 4-bit codes with a scale and zero point per group of input columns."""

    packed: torch.Tensor  # [N, K // 2] uint8, two codes per byte, low nibble = even column
    scales: torch.Tensor  # [N, K // group_size] in the weight's dtype
    zeros: torch.Tensor  # [N, K // group_size] same dtype; w ≈ (q - zero) * scale
    group_size: int
    tinygemm: TinygemmInt4 | None = None  # the same codes in tinygemm's layout (bfloat16 weights only)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))
        return own + (self.tinygemm.nbytes if self.tinygemm is not None else 0)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [..., K] with values 0..15 (K even) -> bytes [..., K // 2], low nibble = even column."""
    if q.shape[-1] % 2:
        raise ValueError(f"the last dimension of int4 codes must be even, got {q.shape[-1]}")
    if q.numel() and (q.min() < 0 or q.max() > INT4_MAX):
        raise ValueError(f"int4 codes must lie in 0..{INT4_MAX}, got {q.min().item()}..{q.max().item()}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)  # [..., K // 2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K // 2] uint8 -> codes [..., K] uint8; the exact inverse of `pack_int4`."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1)  # [..., K // 2, 2]
    return codes.flatten(-2)  # [..., K]


def dequantize_int4(q: Int4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(code - zero) * scale in float32, as [N, K] in `dtype` (default: the dtype of the scales)."""
    n, k = q.shape
    codes = unpack_int4(q.packed).view(n, -1, q.group_size).float()  # [N, G, S]
    w = _dequantize_groups(codes, q.scales.float(), q.zeros.float())  # [N, G, S]
    return w.reshape(n, k).to(dtype or q.scales.dtype)


def int4_linear(x: torch.Tensor, q: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x.dtype: `int4_gemv` for small batches on CUDA, else `int4_dequant_linear`.

    Both multiply with the same weights, up to their rounding: the Triton kernel's tensor-core configs
    use dequantize_int4(q, x.dtype), its CUDA-core ones the float32 values before that rounding.
    """
    lead_shape, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if (
        q.tinygemm is not None
        and x.dtype == torch.bfloat16
        and 1 <= x2.shape[0] <= int4_tinygemm.TINYGEMM_MAX_ROWS
    ):
        return tinygemm_linear(x2, q.tinygemm, bias).reshape(*lead_shape, q.shape[0])
    if not _can_use_triton_gemv(x2, q):
        return int4_dequant_linear(x, q, bias)
    from adaptserve.kernels.triton_quant_gemv import int4_gemv

    return int4_gemv(x2, q, bias).reshape(*lead_shape, q.shape[0])


def int4_dequant_linear(x: torch.Tensor, q: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x.dtype: F.linear with the dequantized weight (the reference path)."""
    return F.linear(x, dequantize_int4(q, x.dtype), bias)


def _can_use_triton_gemv(x: torch.Tensor, q: Int4Weight) -> bool:
    """Whether `int4_gemv` takes these operands: few rows on CUDA, a power-of-two group size."""
    return takes_triton_gemv(x, q.packed) and q.group_size & (q.group_size - 1) == 0


def quantize_int4_weight(w: torch.Tensor, group_size: int = 128, refine_steps: int = 20) -> Int4Weight:
    """w: [N, K] float32/bfloat16/float16 -> Int4Weight; see the module docstring for the method."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point tensor [N, K], got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number (32, 64, 128, ...), got {group_size}")
    if k % group_size:
        raise ValueError(f"group_size={group_size} must divide the number of input columns K={k}")
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
    num_groups = k // group_size
    rows_per_block = max(1, _BLOCK_ELEMENTS.get(w.device.type, 1 << 22) // k)
    codes, scales, zeros = [], [], []
    for start in range(0, n, rows_per_block):
        groups = w[start : start + rows_per_block].float().reshape(-1, group_size)  # [B, S], B = R * G
        block_codes, block_scales, block_zeros = _quantize_groups(groups, w.dtype, refine_steps)
        codes.append(block_codes.to(torch.uint8).view(-1, k))  # [R, K]
        scales.append(block_scales.view(-1, num_groups))  # [R, G]
        zeros.append(block_zeros.view(-1, num_groups))  # [R, G]
    codes = torch.cat(codes)  # [N, K]
    scales, zeros = torch.cat(scales).to(w.dtype), torch.cat(zeros).to(w.dtype)  # [N, G] each
    # bfloat16 weights run with bfloat16 activations, the only ones tinygemm takes
    tinygemm = pack_tinygemm(codes, scales, zeros, group_size) if w.dtype == torch.bfloat16 else None
    return Int4Weight(pack_int4(codes), scales, zeros, group_size, tinygemm)


def _quantize_groups(
    w: torch.Tensor, dtype: torch.dtype, refine_steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: [B, S] float32, one group per row -> codes [B, S] (float32 0..15), scales [B], zeros [B].

    Scales and zeros come back as float32 values that `dtype` represents exactly. A group whose
    step did not lower its error keeps its previous grid and is at a fixed point (the same codes
    give the same fit), so it leaves the loop: later rounds only touch the groups still improving.
    """
    scale, zero = _minmax_params(w, dtype)  # [B], [B]
    q = _nearest_codes(w, scale, zero)  # [B, S]
    # The working set: the groups still improving, compacted; results are copied back by id.
    ids = torch.arange(w.shape[0], device=w.device)  # [A]
    w_act, q_act, scale_act, zero_act = w, q, scale, zero
    error_act = _squared_error(w, q, scale, zero)  # [A]
    for _ in range(refine_steps):
        new_scale, new_zero = _least_squares_params(w_act, q_act, scale_act, zero_act, dtype)  # [A], [A]
        new_q = _nearest_codes(w_act, new_scale, new_zero)  # [A, S]
        new_error = _squared_error(w_act, new_q, new_scale, new_zero)  # [A]
        improved = (new_error < error_act).nonzero()[:, 0]  # [A'] positions in the working set
        if improved.numel() == 0:
            break
        ids = ids.index_select(0, improved)  # [A']
        w_act = w_act.index_select(0, improved)  # [A', S]
        q_act = new_q.index_select(0, improved)  # [A', S]
        scale_act = new_scale.index_select(0, improved)  # [A']
        zero_act = new_zero.index_select(0, improved)  # [A']
        error_act = new_error.index_select(0, improved)  # [A']
        q.index_copy_(0, ids, q_act)
        scale.index_copy_(0, ids, scale_act)
        zero.index_copy_(0, ids, zero_act)
    return q, scale, zero


def _minmax_params(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid from each group's min to its max; constant groups get scale 1, zero -min (exact)."""
    w_min, w_max = w.amin(dim=-1), w.amax(dim=-1)  # [B]
    scale = _stored((w_max - w_min) / INT4_MAX, dtype)  # [B]
    constant = scale <= 0  # [B]: equal values, or a range that underflows the storage dtype
    scale = torch.where(constant, torch.ones_like(scale), scale)
    zero = _stored(torch.where(constant, -w_min, -w_min / scale), dtype)  # [B]
    return scale, zero


def _least_squares_params(
    w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The line w ≈ scale * q - scale * zero that fits each group best for fixed codes q."""
    size = q.shape[-1]
    # Group sums in float32, then the small [A] vectors in float64 to avoid cancellation.
    sum_q = q.sum(dim=-1).double()  # [A]
    sum_w = w.sum(dim=-1).double()  # [A]
    sum_qq = torch.einsum("as,as->a", q, q).double()  # [A]
    sum_qw = torch.einsum("as,as->a", q, w).double()  # [A]
    slope = ((sum_qw - sum_q * sum_w / size) / (sum_qq - sum_q * sum_q / size)).float()  # [A]
    # All codes equal (0/0) or a non-positive slope: no usable fit, keep the current grid.
    usable = torch.isfinite(slope) & (slope > 0)  # [A]
    new_scale = _stored(torch.where(usable, slope, scale), dtype)  # [A]
    usable &= new_scale > 0
    new_scale = torch.where(usable, new_scale, scale)
    # The best intercept for the scale as stored, so rounding the scale costs as little as possible.
    intercept = ((sum_w - new_scale.double() * sum_q) / size).float()  # [A]
    new_zero = _stored(torch.where(usable, -intercept / new_scale, zero), dtype)  # [A]
    return new_scale, new_zero


def _nearest_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The code 0..15 nearest to each element for a fixed grid: w [..., S] -> [..., S] float32."""
    return (w / scale[..., None]).add_(zero[..., None]).round_().clamp_(0, INT4_MAX)


def _dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero[..., None]).mul_(scale[..., None])  # [..., S]


def _squared_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per-group sum of squared reconstruction errors, w and q [A, S], dequantized like `dequantize_int4`."""
    diff = _dequantize_groups(q, scale, zero).sub_(w)  # [A, S]
    return torch.einsum("as,as->a", diff, diff)


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 values to what `dtype` stores, keeping float32 for the arithmetic."""
    return t if dtype == torch.float32 else t.to(dtype).float()
