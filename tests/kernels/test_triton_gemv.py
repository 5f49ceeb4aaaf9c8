"""Triton small-M GEMV against F.linear in float32.

Tolerances: the kernel sums exact products in float32 in its own order, so float32 agrees with
F.linear to float32 rounding of a K-term sum (rtol 1e-5, atol 1e-5 at outputs of order 1). bfloat16
outputs are that sum rounded once, so they sit within half a bfloat16 ulp (at most 2**-8 relative) of
the float32 reference, plus float32 noise (atol 1e-3). Against cuBLAS's bfloat16 output, which rounds
a sum taken in another order, a value near a rounding boundary may land one ulp away: rtol 2**-7.
Weights are scaled by 1/sqrt(K) so that outputs are of order 1 whatever K is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adaptserve.kernels.linear import gemv_row_limit
from adaptserve.kernels.triton_gemv import (
    CONFIGS,
    H100_SMS,
    KERNEL_VERSION,
    configs_for,
    fma_rows,
    gemv,
    num_programs,
    pick_config,
)

BF16_RTOL = 2.0**-8
BENCHMARKS = Path(__file__).parents[2] / "docs" / "benchmarks"


def _inputs(num_rows, out_features, in_features, dtype, seed, device="cpu", bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, in_features, generator=g)  # [M, K]
    weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5  # [N, K]
    b = torch.randn(out_features, generator=g) if bias else None  # [N]
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (x, weight, b))


def _assert_matches_linear(actual, x, weight, bias=None):
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())  # [M, N]
    assert actual.dtype == x.dtype and actual.shape == expected.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(actual.float(), expected, rtol=BF16_RTOL, atol=1e-3)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("num_rows", [1, 3, 16])
def test_every_config_matches_linear(config, num_rows):
    # N and K not multiples of any block: partial column tiles and the masked K tail (and splits)
    x, weight, _ = _inputs(num_rows, 40, 300, torch.float32, seed=num_rows)
    _assert_matches_linear(gemv(x, weight, config=config), x, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 2, 4, 5, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_picked_config_matches_linear(dtype, num_rows, with_bias):
    x, weight, bias = _inputs(num_rows, 96, 1024, dtype, seed=7 + num_rows, bias=with_bias)
    _assert_matches_linear(gemv(x, weight, bias), x, weight, bias)


@pytest.mark.parametrize("split_config", [c for c in CONFIGS if c["split_k"] > 1], ids=str)
def test_split_k_with_bias_and_even_k(split_config):
    """K a multiple of split_k * block_k (the unmasked path) and the bias added after the reduction."""
    in_features = 2 * split_config["split_k"] * split_config["block_k"]
    x, weight, bias = _inputs(3, 50, in_features, torch.bfloat16, seed=11, bias=True)
    _assert_matches_linear(gemv(x, weight, bias, config=split_config), x, weight, bias)


def test_strided_x_and_out_buffer():
    big, weight, _ = _inputs(4, 64, 700, torch.float32, seed=3)
    x = big[:, 50:562]  # [4, 512], row stride 700
    out = torch.full((4, 64), float("nan"))
    returned = gemv(x, weight[:, :512].contiguous(), out=out)
    assert returned is out
    _assert_matches_linear(out, x.contiguous(), weight[:, :512])


def test_bad_shapes():
    x, weight, _ = _inputs(2, 8, 16, torch.float32, seed=1)
    assert gemv(x[:0], weight).shape == (0, 8)
    with pytest.raises(ValueError, match="do not fit"):
        gemv(x, weight[:, :8])
    with pytest.raises(ValueError, match="unit stride"):
        gemv(x, torch.randn(16, 8).t())
    with pytest.raises(ValueError, match="share a dtype"):
        gemv(x, weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="bias must be"):
        gemv(x, weight, torch.zeros(7))


def test_pick_config_fills_the_gpu():
    assert KERNEL_VERSION == 1
    for num_rows in (1, 2, 4, 8, 16):
        assert all(c["use_dot"] or num_rows <= fma_rows(c) for c in configs_for(num_rows))
        for out_features, in_features in ((4096, 4096), (6144, 4096), (4096, 14336), (128256, 4096)):
            config = pick_config(num_rows, out_features, in_features)
            assert config in configs_for(num_rows)
            assert num_programs(config, num_rows, out_features) >= 2 * H100_SMS
    assert pick_config(1, 8, 64) in configs_for(1)  # nothing fills the GPU: the most programs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_routing_and_picks_agree_with_the_h100_measurements(dtype):
    """SmolLM2's projections at 1-16 rows on the H100: where `linear` sends rows to the GEMV, the
    picked config is within 6 % of the fastest config and no slower than cuBLAS (5 % noise); over a
    decode step's projections (30 layers and the LM head) the routing beats cuBLAS alone."""
    name = str(dtype).removeprefix("torch.")
    records = json.loads((BENCHMARKS / f"gemv-smollm2-{name}-h100.json").read_text())["records"]
    routed_rows = set()
    for num_rows in sorted({r["M"] for r in records}):
        step_routed = step_cublas = 0.0
        for shape in ("qkv", "o_proj", "gate_up", "down", "lm_head"):
            runs = [r for r in records if r["shape"] == shape and r["M"] == num_rows and r["ok"]]
            (cublas,) = [r["us"] for r in runs if r["impl"] == "cublas"]
            fastest = min(r["us"] for r in runs if r["config"])
            out_features, in_features = runs[0]["N"], runs[0]["K"]
            chosen = cublas
            if num_rows <= gemv_row_limit(dtype, out_features, in_features):
                picked = pick_config(num_rows, out_features, in_features)
                (chosen,) = [r["us"] for r in runs if r["config"] == picked]
                assert chosen <= 1.06 * fastest and chosen <= 1.05 * cublas, (shape, num_rows, chosen)
                routed_rows.add(num_rows)
            layers = 1 if shape == "lm_head" else 30
            step_routed += layers * chosen
            step_cublas += layers * cublas
        assert step_routed <= 1.01 * step_cublas, (num_rows, step_routed, step_cublas)
    assert routed_rows == ({1, 2, 3, 5, 9, 16} if dtype == torch.float32 else {1, 2})


# ---- real shapes on the GPU ------------------------------------------------------------------------

LLAMA_8B_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N): qkv, o, gate_up, down


@pytest.mark.cuda
@pytest.mark.parametrize("in_features,out_features", LLAMA_8B_SHAPES, ids=str)
@pytest.mark.parametrize("num_rows", [1, 4, 16])
def test_cuda_every_config_real_shapes(in_features, out_features, num_rows):
    x, weight, _ = _inputs(num_rows, out_features, in_features, torch.bfloat16, seed=num_rows, device="cuda")
    for config in configs_for(num_rows):
        _assert_matches_linear(gemv(x, weight, config=config), x, weight)
    torch.testing.assert_close(gemv(x, weight), F.linear(x, weight), rtol=2 * BF16_RTOL, atol=2e-3)


@pytest.mark.cuda
def test_cuda_resources_and_graph_capture():
    x, weight, bias = _inputs(2, 4096, 4096, torch.bfloat16, seed=12, device="cuda", bias=True)
    other = torch.randn_like(x)
    for config in [c for c in configs_for(2) if c["split_k"] > 1][:1] + [configs_for(2)[0]]:
        resources: dict = {}
        out = torch.empty(2, 4096, dtype=torch.bfloat16, device="cuda")
        gemv(x, weight, bias, config=config, out=out, resources=resources)  # compile outside the capture
        assert resources["num_warps"] == config["num_warps"] and resources["regs"] > 0
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gemv(x, weight, bias, config=config, out=out)
        x_saved = x.clone()
        x.copy_(other)
        graph.replay()
        torch.cuda.synchronize()
        _assert_matches_linear(out, other, weight, bias)
        x.copy_(x_saved)


SMOLLM2_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]  # (K, N)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_rows", [1, 2, 3, 5, 9, 16])
def test_cuda_linear_small_rows_smollm2_shapes(dtype, num_rows):
    """`linear` (the GEMV where it routes there, else cuBLAS) against float32 F.linear."""
    from adaptserve.kernels.linear import linear

    for in_features, out_features in SMOLLM2_SHAPES:
        x, weight, _ = _inputs(num_rows, out_features, in_features, dtype, seed=num_rows, device="cuda")
        _assert_matches_linear(linear(x, weight), x, weight)
