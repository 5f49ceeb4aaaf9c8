"""int4 through PyTorch's tinygemm kernel (kernels/quant/int4_tinygemm.py): the layout and zero-point
conversion against our Int4Weight, on the CPU's tinygemm twin here and on CUDA where there is one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptserve.kernels.quant import int4_tinygemm
from adaptserve.kernels.quant.int4 import dequantize_int4, int4_linear, quantize_int4_weight, unpack_int4
from adaptserve.kernels.quant.int4_tinygemm import (
    inner_k_tiles,
    pack_tinygemm,
    scales_and_zeros,
    tinygemm_layout,
    tinygemm_linear,
)


def _bf16_weight(n: int, k: int, group_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).bfloat16()  # [N, K]
    return quantize_int4_weight(w, group_size=group_size, refine_steps=3)


def test_tinygemm_zero_points_give_our_weights():
    q = _bf16_weight(32, 256, 64)
    sz = scales_and_zeros(q.scales, q.zeros).float()  # [G, N, 2]
    codes = unpack_int4(q.packed).float().view(32, -1, 64)  # [N, G, S]
    scale, offset = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # [N, G, 1] each
    theirs = ((codes - 8) * scale + offset).view(32, 256)  # tinygemm's dequantization
    ours = dequantize_int4(q, torch.float32)  # [N, K]
    # the offset (8 - zero) * scale is rounded to bfloat16 once: half an ulp of it, no more
    bound = (offset.abs() * 2.0**-8).expand(-1, -1, 64).reshape(32, 256)
    assert ((theirs - ours).abs() <= bound + 1e-6).all()
    assert (theirs - ours).abs().max() > 0  # the rounding is real: the check above is not vacuous


@pytest.mark.parametrize(
    ("n", "k", "group_size", "rows"), [(64, 256, 64, 1), (96, 512, 128, 7), (32, 512, 256, 16)]
)
def test_tinygemm_linear_matches_the_dequantized_weight_on_cpu(n, k, group_size, rows):
    q = _bf16_weight(n, k, group_size, seed=n)
    assert q.tinygemm is not None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, k, generator=g).bfloat16()  # [M, K]
    bias = torch.randn(n, generator=g).bfloat16()
    out = tinygemm_linear(x, q.tinygemm, bias)  # [M, N]
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    expected = F.linear(x.float(), dequantize_int4(q, torch.float32), bias.float())  # [M, N]
    assert ((out.float() - expected).norm() / expected.norm()).item() < 0.01
    # a zero point taken as ours (q - zero) * scale instead of tinygemm's is far off
    wrong = int4_tinygemm.TinygemmInt4(
        q.tinygemm.packed, torch.stack((q.scales, q.zeros), -1).transpose(0, 1).contiguous(), group_size
    )
    assert ((tinygemm_linear(x, wrong, bias).float() - expected).norm() / expected.norm()).item() > 0.1


def test_int4_linear_takes_tinygemm_for_small_bf16_batches_only(monkeypatch):
    q = _bf16_weight(64, 256, 64)
    calls = []
    real = int4_tinygemm.tinygemm_linear
    monkeypatch.setattr(
        "adaptserve.kernels.quant.int4.tinygemm_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a)
    )
    monkeypatch.setattr(int4_tinygemm, "TINYGEMM_MAX_ROWS", 8)
    x = torch.randn(3, 4, 256).bfloat16()  # [B, T, K]: 12 rows, over the limit
    assert int4_linear(x[0], q).shape == (4, 64) and calls == [4]
    assert torch.equal(int4_linear(x, q), F.linear(x, dequantize_int4(q, torch.bfloat16)))  # 12 rows
    int4_linear(x[0].float(), q)  # float32 activations: never tinygemm
    q32 = quantize_int4_weight(torch.randn(64, 256), group_size=64)  # a float32 weight has no copy
    assert q32.tinygemm is None
    monkeypatch.setattr(int4_tinygemm, "TINYGEMM_MAX_ROWS", 0)  # off
    int4_linear(x[0], q)
    assert calls == [4]


def test_tinygemm_layout_limits():
    cpu = torch.device("cpu")
    assert tinygemm_layout(64, 4096, 128, cpu) == 8
    assert tinygemm_layout(64, 576, 64, cpu) == 4  # SmolLM2's hidden size: 36 k-tiles
    assert tinygemm_layout(64, 576, 96, cpu) is None  # a group size tinygemm lacks
    assert tinygemm_layout(24, 512, 128, cpu) is None  # N not a multiple of 16 (the CPU kernel's rule)
    assert inner_k_tiles(4096 + 32) == 2 and inner_k_tiles(48) is None
    q = _bf16_weight(24, 256, 64)
    assert q.tinygemm is None and pack_tinygemm(unpack_int4(q.packed), q.scales, q.zeros, 64) is None
    q = _bf16_weight(32, 256, 64)
    assert q.nbytes == 32 * 128 + 2 * 32 * 4 * 2 + q.tinygemm.nbytes


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 16, 33])
def test_tinygemm_on_cuda_matches_the_reference(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(1024, 4096, generator=g).bfloat16().cuda()  # [N, K]
    q = quantize_int4_weight(w, group_size=128)
    assert q.tinygemm is not None and q.tinygemm.packed.dim() == 4
    x = torch.randn(rows, 4096, generator=g).bfloat16().cuda()  # [M, K]
    bias = torch.randn(1024, generator=g).bfloat16().cuda()
    expected = F.linear(x.float(), dequantize_int4(q, torch.float32), bias.float())  # [M, N]
    out = int4_linear(x, q, bias)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 0.01
    out = tinygemm_linear(x, q.tinygemm, bias)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 0.01
