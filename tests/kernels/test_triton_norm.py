"""Triton RMSNorm (with and without the fused residual add) against the model's RMSNorm.

Tolerances: the kernel rounds where the model rounds (the residual add, the normalised row, the
product with the weight), so only the float32 sum of squares and rsqrt differ from PyTorch. A
normalised value next to a rounding boundary can therefore round to its neighbour: each output must be
weight * n rounded, where n is the model's normalised value or one of its two neighbours in the model
dtype (1 ulp), and almost all must be exact. (Measured over 64 x 4096 rows: bfloat16 exact, float16
off in about 4e-5 of the values.) The residual add is the same float32 add and rounding: bit-exact.
float32 agrees to a few float32 ulps (rtol 2e-6, atol 1e-6).
"""

from __future__ import annotations

import pytest
import torch

from adaptserve.kernels.triton_norm import CONFIGS, KERNEL_VERSION, rms_norm
from adaptserve.model.llama import RMSNorm

EPS = 1e-5


def _inputs(num_rows: int, hidden: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    """Rows of very different scales (as activations are) and a weight spread around 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, hidden, generator=g) * 10.0 ** torch.empty(num_rows, 1).uniform_(
        -2, 2, generator=g
    )
    residual = torch.randn(num_rows, hidden, generator=g) * 4  # [T, hidden]
    weight = 1 + 0.3 * torch.randn(hidden, generator=g)  # [hidden]
    return (t.to(device=device, dtype=dtype) for t in (x, residual, weight))


def _reference_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    norm = RMSNorm(x.shape[1], EPS).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def _assert_matches_model(actual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """actual must be the model's RMSNorm(x) up to one rounding step of the normalised row."""
    expected = _reference_norm(x, weight)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)  # GPU rsqrt differs slightly
        return
    normed = _reference_norm(x, torch.ones_like(weight))  # [T, hidden]: 1 * n is n, no rounding
    inf = torch.full_like(normed, float("inf"))
    neighbours = (torch.nextafter(normed, inf), torch.nextafter(normed, -inf))
    allowed = actual == expected
    assert allowed.float().mean().item() > 0.99  # off-by-one roundings are rare, not systematic
    for n in neighbours:
        allowed |= actual == weight * n  # the model's product, rounded in its dtype
    assert allowed.all(), f"{(~allowed).sum().item()} values beyond 1 ulp of the normalised row"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 576, 1000, 2048])
@pytest.mark.parametrize("rows_per_program", [1, 4])
def test_rms_norm_matches_model(dtype, hidden, rows_per_program):
    x, _, weight = _inputs(7, hidden, dtype, seed=hidden)
    _assert_matches_model(rms_norm(x, weight, EPS, rows_per_program=rows_per_program), x, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [576, 2048])
def test_fused_residual_add(dtype, hidden):
    x, residual, weight = _inputs(9, hidden, dtype, seed=hidden + 1)
    expected_residual = residual + x  # the model's add, in its dtype
    original_x = x.clone()
    out, returned = rms_norm(x, weight, EPS, residual, rows_per_program=2)
    assert returned is residual  # updated in place
    assert torch.equal(residual, expected_residual)
    assert torch.equal(x, original_x)
    _assert_matches_model(out, expected_residual, weight)


def test_strided_rows_and_out_buffer():
    big = torch.randn(5, 700).to(torch.bfloat16)  # [T, 700]
    x = big[:, 50:626]  # [T, 576], row stride 700
    _, _, weight = _inputs(5, 576, torch.bfloat16, seed=3)
    out = torch.full((5, 576), float("nan"), dtype=torch.bfloat16)
    returned = rms_norm(x, weight, EPS, out=out)
    assert returned is out
    _assert_matches_model(out, x.contiguous(), weight)


def test_no_rows_and_bad_layout():
    weight = torch.ones(64)
    assert rms_norm(torch.empty(0, 64), weight, EPS).shape == (0, 64)
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm(torch.randn(64, 8).t(), weight, EPS)


def test_configs_are_keyword_arguments():
    assert KERNEL_VERSION == 1 and CONFIGS
    x, _, weight = _inputs(3, 576, torch.bfloat16, seed=5)
    for config in CONFIGS[:3]:
        _assert_matches_model(rms_norm(x, weight, EPS, **config), x, weight)


# ---- real shapes on the GPU ------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # float32: SmolLM2's reference runs
@pytest.mark.parametrize("num_rows", [1, 64, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_cuda_real_shapes(dtype, num_rows, with_residual):
    x, residual, weight = _inputs(num_rows, 4096, dtype, seed=num_rows, device="cuda")
    if not with_residual:
        _assert_matches_model(rms_norm(x, weight, EPS), x, weight)
        return
    expected_residual = residual + x
    out, _ = rms_norm(x, weight, EPS, residual)
    assert torch.equal(residual, expected_residual)
    _assert_matches_model(out, expected_residual, weight)


@pytest.mark.cuda
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_cuda_every_config_reports_resources(config):
    x, residual, weight = _inputs(64, 4096, torch.bfloat16, seed=11, device="cuda")
    resources: dict = {}
    out, _ = rms_norm(x, weight, EPS, residual.clone(), resources=resources, **config)
    _assert_matches_model(out, residual + x, weight)
    assert resources["num_warps"] == config["num_warps"] and resources["regs"] > 0
    assert {"spills", "shared"} <= resources.keys()


@pytest.mark.cuda
def test_cuda_graph_capture():
    x, residual, weight = _inputs(64, 4096, torch.bfloat16, seed=12, device="cuda")
    out = torch.empty_like(x)
    rms_norm(x, weight, EPS, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rms_norm(x, weight, EPS, out=out)
    x.copy_(residual)
    graph.replay()
    torch.cuda.synchronize()
    _assert_matches_model(out, residual, weight)
