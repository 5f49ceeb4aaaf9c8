"""FP8 e4m3 weights and activations: round-trip error bounds, the emulated GEMM, and the CUDA path.

Error bounds used below (s = the row's scale = row absmax / 448, values are divided by s first):
- e4m3 has 3 mantissa bits, so in the normal range (|w| / s >= 2^-6, the smallest normal) the
  spacing of the float8 grid is 2^-3 of the leading power of two and round-to-nearest errs by at
  most 2^-4 of |w|.
- below 2^-6 the grid is the subnormal one with spacing 2^-9, so the error is at most 2^-10 * s.
- float32 rounding of w / s and of q * s adds about 2^-24 relative, far inside both bounds.
"""

from __future__ import annotations

import pytest
import torch

from adaptserve.kernels.quant import (
    Fp8Weight,
    dequantize_fp8,
    fp8_linear,
    quantize_fp8_activation,
    quantize_fp8_weight,
)
from adaptserve.kernels.quant.fp8 import FP8_MAX, TRITON_GEMV_MAX_ROWS, _can_use_scaled_mm, fp8_w8a8_linear


def _weights(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, with tiny elements that land in the subnormal range."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)  # [N, K]
    w *= 10.0 ** torch.empty(n, 1).uniform_(-3, 3, generator=g)  # row magnitudes from 1e-3 to 1e3
    tiny = torch.rand(n, k, generator=g) < 0.1  # [N, K]
    w[tiny] *= 2.0**-16  # |w| / s about 448 / 4 * 2^-16 < 2^-6: subnormal in e4m3
    return w.to(dtype)


def _rel_frobenius(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_round_trip_error_bounds(dtype):
    w = _weights(64, 256, dtype).float()  # [N, K] exact values of the input
    wq = quantize_fp8_weight(w.to(dtype))
    assert wq.weight.dtype == torch.float8_e4m3fn and wq.weight.shape == (64, 256)
    assert wq.scale.dtype == torch.float32 and wq.scale.shape == (64,)
    scale = wq.scale[:, None]  # [N, 1]
    error = (dequantize_fp8(wq, torch.float32) - w).abs()  # [N, K]
    normal = w.abs() >= 2.0**-6 * scale  # [N, K]; includes every |w| >= 2^-6 * absmax
    assert normal.any() and (~normal).any()
    assert (error <= 2.0**-4 * w.abs())[normal].all()
    assert (error <= (2.0**-10 + 2.0**-20) * scale.expand_as(w))[~normal].all()


def test_row_absmax_maps_to_448_and_round_trips():
    w = _weights(256, 128, torch.float32)  # [N, K]
    absmax = w.abs().amax(dim=1)  # [N]
    wq = quantize_fp8_weight(w)
    assert torch.equal(wq.weight.float().abs().amax(dim=1), torch.full((256,), FP8_MAX))
    # In float32, 448 * fl(absmax / 448) comes back within one rounding of absmax (two roundings of
    # 2^-24 each); it cannot always be exact: no float32 scale works for about 1 absmax in 12.
    back = dequantize_fp8(wq, torch.float32).abs().amax(dim=1)  # [N]
    assert ((back - absmax).abs() <= absmax * 2.0**-23).all()
    # A bfloat16 checkpoint gets its absmax back exactly: that float32 error is far below half a
    # bfloat16 step (2^-9), so the cast back rounds to the original value.
    w16 = w.bfloat16()
    back16 = dequantize_fp8(quantize_fp8_weight(w16), torch.bfloat16).abs().amax(dim=1)  # [N]
    assert torch.equal(back16, w16.abs().amax(dim=1))


def test_zero_rows_get_scale_one():
    w = torch.randn(8, 32)  # [N, K]
    w[[2, 5]] = 0.0
    wq = quantize_fp8_weight(w)
    assert torch.equal(wq.scale[[2, 5]], torch.ones(2))
    assert torch.equal(dequantize_fp8(wq, torch.float32)[[2, 5]], torch.zeros(2, 32))
    x = torch.randn(4, 32)  # [M, K]
    x[1] = 0.0
    x_fp8, x_scale = quantize_fp8_activation(x)
    assert x_scale[1, 0] == 1.0 and not x_fp8.float().isnan().any()
    bias = torch.randn(8)
    out = fp8_linear(x, wq, bias)  # [M, N]
    assert torch.equal(out[1], bias)
    assert torch.equal(out[:, 2], bias[2].expand(4))


def test_activation_quantization_is_per_token():
    x = torch.randn(5, 64) * torch.tensor([[1e-2], [1.0], [3.0], [1e2], [7.0]])  # [M, K]
    x_fp8, x_scale = quantize_fp8_activation(x)
    assert x_fp8.shape == (5, 64) and x_fp8.dtype == torch.float8_e4m3fn
    assert x_scale.shape == (5, 1) and x_scale.dtype == torch.float32
    assert torch.equal(x_scale[:, 0], x.abs().amax(dim=1) / FP8_MAX)
    as_weight = quantize_fp8_weight(x)  # the same per-row rule as the weights
    assert torch.equal(x_fp8.view(torch.uint8), as_weight.weight.view(torch.uint8))
    assert torch.equal(x_scale[:, 0], as_weight.scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_linear_close_to_float32_matmul(dtype, with_bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 512, generator=g).to(dtype)  # [M, K]
    w = (torch.randn(384, 512, generator=g) / 512**0.5).to(dtype)  # [N, K]
    bias = torch.randn(384, generator=g).to(dtype) if with_bias else None
    out = fp8_linear(x, quantize_fp8_weight(w), bias)  # [M, N]
    assert out.shape == (24, 384) and out.dtype == dtype
    reference = x.float() @ w.float().t()  # [M, N]
    if bias is not None:
        reference += bias.float()
    # Each operand carries an e4m3 rounding error of about 2^-3 / sqrt(12) / 1.44 ≈ 2.5% RMS of its
    # magnitude; the two are independent, so each product term is off by about 3.5% RMS and, with
    # independent terms, so is the sum. 6% leaves room for the sample.
    assert _rel_frobenius(out, reference) < 0.06


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulation_equals_hand_written_reference(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 96, generator=g).to(dtype)  # [M, K]
    w = torch.randn(40, 96, generator=g).to(dtype)  # [N, K]
    bias = torch.randn(40, generator=g).to(dtype)
    wq = quantize_fp8_weight(w)
    x_fp8, x_scale = quantize_fp8_activation(x)  # [M, K], [M, 1]
    acc = x_fp8.float() @ wq.weight.float().t()  # [M, N]
    expected = (acc * x_scale * wq.scale[None, :]).to(dtype)  # [M, N]
    assert torch.equal(fp8_w8a8_linear(x, wq), expected)
    assert torch.equal(fp8_w8a8_linear(x, wq, bias), expected + bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_batches_are_weight_only_and_prompt_chunks_w8a8(dtype):
    """Up to TRITON_GEMV_MAX_ROWS rows the activations are not rounded to float8 (the numbers the GPU's
    fp8_gemv serves in decode); past it they are (W8A8, as torch._scaled_mm computes)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 96, generator=g).to(dtype)  # [N, K]
    bias = torch.randn(40, generator=g).to(dtype)
    wq = quantize_fp8_weight(w)
    for rows in (1, TRITON_GEMV_MAX_ROWS):
        x = torch.randn(rows, 96, generator=g).to(dtype)  # [M, K]
        weight_only = (x.float() @ wq.weight.float().t() * wq.scale[None, :] + bias.float()).to(dtype)
        assert torch.equal(fp8_linear(x, wq, bias), weight_only)
        assert not torch.equal(fp8_linear(x, wq, bias), fp8_w8a8_linear(x, wq, bias))
    x = torch.randn(TRITON_GEMV_MAX_ROWS + 1, 96, generator=g).to(dtype)  # [M, K]
    assert torch.equal(fp8_linear(x, wq, bias), fp8_w8a8_linear(x, wq, bias))


def test_fp8_linear_keeps_leading_dimensions():
    x = torch.randn(2, 3, 64)  # [B, T, K]
    wq = quantize_fp8_weight(torch.randn(48, 64))
    out = fp8_linear(x, wq)  # [B, T, N]
    assert out.shape == (2, 3, 48)
    assert torch.equal(out, fp8_linear(x.reshape(6, 64), wq).reshape(2, 3, 48))


def test_nbytes_counts_codes_and_scales():
    wq = quantize_fp8_weight(torch.randn(256, 512))
    assert wq.nbytes == 256 * 512 + 4 * 256
    assert isinstance(wq, Fp8Weight)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scaled_mm_matches_emulation_on_cuda(dtype):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm needs compute capability 8.9 or newer")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, 512, generator=g).to(dtype)  # [M, K], M not a multiple of 16
    w = (torch.randn(256, 512, generator=g) / 512**0.5).to(dtype)  # [N, K]
    bias = torch.randn(256, generator=g).to(dtype)
    wq_cpu = quantize_fp8_weight(w)
    wq = quantize_fp8_weight(w.cuda())
    # the GPU's division may round a value on a code boundary the other way: at most a few codes differ,
    # each by one step
    codes_gpu, codes_cpu = wq.weight.cpu().view(torch.uint8), wq_cpu.weight.view(torch.uint8)
    assert (codes_gpu != codes_cpu).float().mean() < 1e-3
    assert (wq.weight.cpu().float() - wq_cpu.weight.float()).abs().max() <= 32  # one step near 448
    assert _can_use_scaled_mm(x.cuda(), wq)
    out = fp8_linear(x.cuda(), wq, bias.cuda())  # [M, N] from the float8 tensor cores
    emulated = fp8_linear(x, wq_cpu, bias)  # [M, N] the same float8 values, float32 on CPU
    assert out.dtype == dtype
    assert _rel_frobenius(out.cpu(), emulated) < 0.01
    # N = 40 is not a multiple of 16: the emulation runs on the GPU instead.
    wq_odd = quantize_fp8_weight(w[:40].cuda())
    assert not _can_use_scaled_mm(x.cuda(), wq_odd)
    emulated_odd = fp8_linear(x, quantize_fp8_weight(w[:40]))  # [M, 40]
    assert _rel_frobenius(fp8_linear(x.cuda(), wq_odd).cpu(), emulated_odd) < 0.01
