"""Triton silu_and_mul against PyTorch's `F.silu(gate) * up`.

Tolerances: on the GPU the kernel calls the functions PyTorch's CUDA kernel calls (libdevice expf, an
IEEE division) and rounds where it rounds, so bfloat16 must be bit-exact there. Under the CPU
interpreter the exponential is numpy's, so silu(gate) next to a rounding boundary can round to its
neighbour: each output must be PyTorch's, or up times a neighbour of PyTorch's silu(gate) (1 ulp),
and almost all must be exact. (Measured over 37 x 1000: bfloat16 exact, float16 off in about 2e-4 of
the values.) float32 agrees to a few float32 ulps (rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptserve.kernels.activation import silu_and_mul as dispatch_silu_and_mul
from adaptserve.kernels.triton_activation import CONFIGS, KERNEL_VERSION, silu_and_mul


def _inputs(num_rows: int, intermediate: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    """gate and up of the spread an MLP sees (gate mostly within +-8, where silu bends)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, 2 * intermediate, generator=g) * 3  # [T, 2I]
    return x.to(device=device, dtype=dtype)


def _reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)  # [T, I] each
    return F.silu(gate) * up


def _assert_matches_torch(actual: torch.Tensor, x: torch.Tensor) -> None:
    """actual must be PyTorch's silu(gate) * up up to one rounding step of silu(gate)."""
    expected = _reference(x)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        return
    gate, up = x.chunk(2, dim=-1)
    silu = F.silu(gate)  # [T, I] in the model dtype
    inf = torch.full_like(silu, float("inf"))
    allowed = actual == expected
    assert allowed.float().mean().item() > 0.99  # off-by-one roundings are rare, not systematic
    for neighbour in (torch.nextafter(silu, inf), torch.nextafter(silu, -inf)):
        allowed |= actual == neighbour * up  # the model's product, rounded in its dtype
    assert allowed.all(), f"{(~allowed).sum().item()} values beyond 1 ulp of silu(gate)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows", [1, 37])
@pytest.mark.parametrize("intermediate", [64, 1000, 1536])
def test_silu_and_mul_matches_torch(dtype, num_rows, intermediate):
    x = _inputs(num_rows, intermediate, dtype, seed=intermediate + num_rows)
    _assert_matches_torch(silu_and_mul(x, block=512), x)  # 1000 and 1536 end in a partial block


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # numpy exp(200) is inf, as intended
def test_extreme_gates():
    """Large gates: exp(-gate) underflows (silu = gate) or overflows to inf (silu = -0)."""
    gate = torch.tensor([[-200.0, -90.0, -20.0, -0.0, 0.0, 1e-3, 20.0, 90.0, 3e38]])
    x = torch.cat([gate, torch.full_like(gate, 1.5)], dim=1).to(torch.bfloat16)  # [1, 2I]
    out = silu_and_mul(x, block=16)
    assert torch.equal(out, _reference(x))


def test_strided_rows_and_out_buffer():
    big = _inputs(5, 700, torch.bfloat16, seed=3)  # [T, 1400]
    x = big[:, 100:1300]  # [T, 1200], row stride 1400
    out = torch.full((5, 600), float("nan"), dtype=torch.bfloat16)
    returned = silu_and_mul(x, out=out)
    assert returned is out
    _assert_matches_torch(out, x.contiguous())


def test_no_rows_and_bad_layout():
    assert silu_and_mul(torch.empty(0, 64)).shape == (0, 32)
    with pytest.raises(ValueError, match="unit stride"):
        silu_and_mul(torch.randn(64, 8).t())
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul(torch.randn(4, 7))


def test_configs_are_keyword_arguments():
    assert KERNEL_VERSION == 1 and CONFIGS
    x = _inputs(3, 1000, torch.bfloat16, seed=5)
    for config in CONFIGS[:3]:
        _assert_matches_torch(silu_and_mul(x, **config), x)


def test_dispatcher_uses_torch_off_cuda():
    x = _inputs(4, 96, torch.bfloat16, seed=6)
    assert torch.equal(dispatch_silu_and_mul(x), _reference(x))
    x3 = _inputs(6, 96, torch.float32, seed=7).view(2, 3, 192)  # leading dims pass through
    assert torch.equal(dispatch_silu_and_mul(x3), _reference(x3))


# ---- real shapes on the GPU ------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows", [1, 64, 4096])
def test_cuda_bit_exact_real_shapes(dtype, num_rows):
    x = _inputs(num_rows, 14336, dtype, seed=num_rows, device="cuda")
    out = silu_and_mul(x)
    expected = _reference(x)
    mismatches = (out != expected).sum().item()
    assert mismatches == 0, f"{mismatches} of {out.numel()} values differ from F.silu(gate) * up"
    assert torch.equal(dispatch_silu_and_mul(x), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("num_rows", [1, 5, 64])
def test_cuda_float32_goes_to_triton_and_agrees(num_rows):
    """float32 (SmolLM2's reference runs) takes the Triton kernel too: a few float32 ulps off PyTorch."""
    x = _inputs(num_rows, 1536, torch.float32, seed=num_rows, device="cuda")
    out = dispatch_silu_and_mul(x)
    torch.testing.assert_close(out, _reference(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(out, silu_and_mul(x))  # the dispatcher took the kernel


@pytest.mark.cuda
def test_cuda_bit_exact_every_input():
    """Every finite bfloat16 gate against a few ups, except gates so tiny that a product would leave
    float32's normal range (flush-to-zero territory; see triton_activation.py)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)  # every bf16 bit pattern
    gate = bits.view(torch.bfloat16).float()
    gate = gate[gate.isfinite() & ((gate.abs() >= 2.0**-100) | (gate == 0))]  # [G]
    up = torch.tensor([1.0, -0.3, 7.5])  # [U]
    gate_grid = gate[:, None].expand(-1, len(up)).reshape(1, -1)  # [1, G * U]
    up_grid = up[None, :].expand(len(gate), -1).reshape(1, -1)  # [1, G * U]
    x = torch.cat([gate_grid, up_grid], dim=1).to(device="cuda", dtype=torch.bfloat16)  # [1, 2 G U]
    out = silu_and_mul(x)
    expected = _reference(x)
    same = (out == expected) | (out.isnan() & expected.isnan())
    assert same.all(), f"{(~same).sum().item()} values differ, e.g. gate {x[0, : out.shape[1]][~same[0]][:5]}"


@pytest.mark.cuda
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_cuda_every_config_reports_resources(config):
    x = _inputs(64, 14336, torch.bfloat16, seed=11, device="cuda")
    resources: dict = {}
    assert torch.equal(silu_and_mul(x, resources=resources, **config), _reference(x))
    assert resources["num_warps"] == config["num_warps"] and resources["regs"] > 0
    assert {"spills", "shared"} <= resources.keys()


@pytest.mark.cuda
def test_cuda_graph_capture():
    x = _inputs(64, 14336, torch.bfloat16, seed=12, device="cuda")
    other = _inputs(64, 14336, torch.bfloat16, seed=13, device="cuda")
    out = torch.empty(64, 14336, dtype=torch.bfloat16, device="cuda")
    silu_and_mul(x, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        silu_and_mul(x, out=out)
    x.copy_(other)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, _reference(other))
