"""Triton small-batch GEMV for fp8 and int4 weights against float64 products with the dequantized weights.

Tolerances: with float32 activations the kernels sum float32 products in float32, so they agree with
the float64 reference to float32 rounding of a K-term sum (rtol 1e-5, atol 1e-5 at outputs of order 1;
weights are scaled by 1/sqrt(K) for that). A wrong code, scale, zero or column is off by a sizable
fraction of a term, at least 1e-3 here. bfloat16 outputs are that sum rounded once: within half a
bfloat16 ulp (2**-8 relative) plus float32 noise. On the GPU the tensor-core configs also round an int4
weight to bfloat16 first (relative 2**-9 per weight, independent signs): about 2**-9 / sqrt(3) of the
outputs' RMS per output, so 2**-6 of the RMS is more than ten standard deviations of that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptserve.kernels.quant import (
    dequantize_fp8,
    dequantize_int4,
    quantize_fp8_weight,
    quantize_int4_weight,
)
from adaptserve.kernels.quant.int4 import Int4Weight, pack_int4
from adaptserve.kernels.quant_gemv_configs import CONFIGS, FMA_MAX_ROWS, block_rows, configs_for, pick_config
from adaptserve.kernels.triton_quant_gemv import fp8_gemv, int4_gemv

BENCHMARKS = Path(__file__).parents[2] / "docs/benchmarks"  # measured configs

BF16_RTOL = 2.0**-8
# (M, N, K, group size): partial row, column and K tiles everywhere; 8 rows take two CUDA-core programs
CASES = [(1, 48, 256, 32), (3, 16, 64, 64), (8, 48, 256, 64)]


def _inputs(num_rows, out_features, in_features, dtype, seed, device="cpu", bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, in_features, generator=g).to(device=device, dtype=dtype)  # [M, K]
    w = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(device)  # [N, K]
    b = torch.randn(out_features, generator=g).to(device=device, dtype=dtype) if bias else None  # [N]
    return x, w, b


def _reference(x, weight, bias=None):
    """x @ weight.T + bias in float64, weight [N, K] the dequantized weight."""
    out = x.double() @ weight.double().t()  # [M, N]
    return out if bias is None else out + bias.double()


def _assert_close(actual, x, expected, rtol=BF16_RTOL, atol_rms=0.0):
    assert actual.dtype == x.dtype and actual.shape == expected.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        atol = max(1e-3, atol_rms * expected.square().mean().sqrt().item())
        torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


def _param_id(value) -> str:
    if not isinstance(value, dict):
        return str(value)
    kind = "folded" if value.get("folded") else "dot" if value["use_dot"] else "fma"
    return f"{kind}-n{value['block_n']}-k{value['block_k']}-s{value['split_k']}-w{value['num_warps']}"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("config", CONFIGS["fp8"], ids=_param_id)
def test_fp8_every_config(config, case):
    num_rows, out_features, in_features, _ = case
    x, w, _ = _inputs(num_rows, out_features, in_features, torch.float32, seed=num_rows)
    wq = quantize_fp8_weight(w)
    expected = _reference(x, dequantize_fp8(wq, torch.float64))
    _assert_close(fp8_gemv(x, wq, config=config), x, expected)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("config", CONFIGS["int4"], ids=_param_id)
def test_int4_every_config(config, case):
    num_rows, out_features, in_features, group_size = case
    x, w, _ = _inputs(num_rows, out_features, in_features, torch.float32, seed=num_rows)
    q = quantize_int4_weight(w, group_size)
    expected = _reference(x, dequantize_int4(q, torch.float32))
    _assert_close(int4_gemv(x, q, config=config), x, expected)


@pytest.mark.parametrize("kind,config", [(k, c) for k in CONFIGS for c in CONFIGS[k]], ids=_param_id)
def test_even_k_with_bias(kind, config):
    """K a multiple of split_k * block_k (the unmasked path); with split_k > 1 the bias is added after the
    reduction."""
    in_features = config["split_k"] * config["block_k"]
    x, w, bias = _inputs(2, 16, in_features, torch.float32, seed=in_features, bias=True)
    if kind == "fp8":
        wq = quantize_fp8_weight(w)
        actual, weight = fp8_gemv(x, wq, bias, config=config), dequantize_fp8(wq, torch.float64)
    else:
        q = quantize_int4_weight(w, group_size=128, refine_steps=0)
        actual, weight = int4_gemv(x, q, bias, config=config), dequantize_int4(q, torch.float32)
    _assert_close(actual, x, _reference(x, weight, bias))


@pytest.mark.parametrize("split_k", [1, 2])
def test_int4_tiles_shorter_than_a_group(split_k):
    """block_k < group_size: each tile lies inside one group, and splits may start mid-group."""
    config = dict(block_n=16, block_k=32, split_k=split_k, num_warps=4, num_stages=1, use_dot=True)
    x, w, _ = _inputs(3, 24, 384, torch.float32, seed=5)
    q = quantize_int4_weight(w, group_size=128)
    expected = _reference(x, dequantize_int4(q, torch.float32))
    _assert_close(int4_gemv(x, q, config=config), x, expected)
    _assert_close(int4_gemv(x, q, config=dict(config, use_dot=False, block_n=4)), x, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows", [1, 3, 20])
def test_picked_config_half_precision_with_bias(dtype, num_rows):
    x, w, bias = _inputs(num_rows, 48, 512, dtype, seed=num_rows, bias=True)
    wq = quantize_fp8_weight(w)
    _assert_close(fp8_gemv(x, wq, bias), x, _reference(x, dequantize_fp8(wq, torch.float64), bias))
    q = quantize_int4_weight(w.to(dtype), group_size=64)  # scales and zeros in the half dtype
    _assert_close(int4_gemv(x, q, bias), x, _reference(x, dequantize_int4(q, torch.float32), bias))


FOLDED = dict(block_n=4, block_k=256, split_k=1, num_warps=4, num_stages=1, use_dot=False, folded=True)


@pytest.mark.parametrize("num_rows", [1, 3, 17, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tile",
    [dict(), dict(block_n=8, block_k=64), dict(block_n=2, block_k=512, split_k=2)],
    ids=["n4-k256", "n8-k64-tile-inside-a-group", "n2-k512-s2"],
)
def test_int4_folded(tile, dtype, num_rows):
    """The folded kernel (int32 words, zero and scale per group): odd row counts (more than FMA_MAX_ROWS
    take several row blocks), N = 21 not a multiple of BLOCK_N, K = 640 not a multiple of the tile,
    a bias, and codes spanning 0..15 in every nibble position of a word."""
    x, w, bias = _inputs(num_rows, 21, 640, dtype, seed=num_rows, bias=True)
    q = quantize_int4_weight(w.to(dtype), group_size=128)
    for nibbles in (q.packed & 0xF, q.packed >> 4):  # even and odd columns both take codes 0 and 15
        assert nibbles.min() == 0 and nibbles.max() == 15
    expected = _reference(x, dequantize_int4(q, torch.float32), bias)
    _assert_close(int4_gemv(x, q, bias, config=dict(FOLDED, **tile)), x, expected)


def test_int4_folded_every_nibble():
    """One code at a time at each of a word's eight nibbles, with a zero point and scale that are not 0
    and 1: any wrong nibble, shift or exponent shows as a wrong column."""
    in_features, group_size = 64, 32
    codes = torch.zeros(in_features, in_features, dtype=torch.uint8)  # row r: code 9 at column r, 0 else
    codes[torch.arange(in_features), torch.arange(in_features)] = 9
    codes[:, -1] += 15 * (torch.arange(in_features) != in_features - 1)  # and 15 at the last column
    scales = torch.full((in_features, in_features // group_size), 0.5) + torch.rand(in_features, 2)
    zeros = torch.full((in_features, in_features // group_size), 3.0)
    q = Int4Weight(pack_int4(codes), scales, zeros, group_size)
    x = torch.randn(5, in_features)
    for config in [c for c in CONFIGS["int4"] if c.get("folded")][:2] + [dict(FOLDED, block_k=32)]:
        expected = _reference(x, dequantize_int4(q, torch.float32))
        _assert_close(int4_gemv(x, q, config=config), x, expected)


def test_int4_folded_falls_back_to_bytes():
    """Codes that cannot be read as int32 words (a view starting at an odd byte) take the byte kernel."""
    x, w, _ = _inputs(2, 8, 256, torch.float32, seed=4)
    q = quantize_int4_weight(w, group_size=64)
    storage = torch.zeros(8, 129, dtype=torch.uint8)
    storage[:, 1:] = q.packed
    shifted = Int4Weight(storage[:, 1:], q.scales, q.zeros, 64)  # row stride 129 bytes
    expected = _reference(x, dequantize_int4(q, torch.float32))
    _assert_close(int4_gemv(x, shifted, config=FOLDED), x, expected)


def test_strided_x():
    big, w, _ = _inputs(4, 32, 700, torch.float32, seed=3)
    x = big[:, 50:306]  # [4, 256], row stride 700
    wq, q = quantize_fp8_weight(w[:, :256]), quantize_int4_weight(w[:, :256], group_size=32)
    _assert_close(fp8_gemv(x, wq), x, _reference(x, dequantize_fp8(wq, torch.float64)))
    _assert_close(int4_gemv(x, q), x, _reference(x, dequantize_int4(q, torch.float32)))


def test_bad_inputs():
    x, w, _ = _inputs(2, 8, 64, torch.float32, seed=1)
    wq, q = quantize_fp8_weight(w), quantize_int4_weight(w, group_size=32)
    assert fp8_gemv(x[:0], wq).shape == (0, 8) and int4_gemv(x[:0], q).shape == (0, 8)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        fp8_gemv(x[:, :32], wq)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        int4_gemv(x[:, :32], q)
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        fp8_gemv(x.double(), wq)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        int4_gemv(x, q, torch.zeros(7))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemv(x, type(wq)(weight=w, scale=wq.scale))
    with pytest.raises(ValueError, match=r"scale must be \[8\]"):
        fp8_gemv(x, type(wq)(weight=wq.weight, scale=wq.scale[:4]))
    odd_groups = quantize_int4_weight(torch.randn(8, 96), group_size=48)
    with pytest.raises(ValueError, match="power-of-two group_size .* got 48"):
        int4_gemv(torch.randn(2, 96), odd_groups)
    with pytest.raises(ValueError, match="K=64 must be a multiple of group_size=128"):
        int4_gemv(x, Int4Weight(q.packed, q.scales, q.zeros, group_size=128))
    with pytest.raises(ValueError, match=r"zeros must be \[8, 2\]"):
        int4_gemv(x, Int4Weight(q.packed, q.scales, q.zeros[:, :1], group_size=32))


def test_pick_config_suits_the_rows():
    for kind in ("fp8", "int4"):
        for num_rows in (1, 2, 4, 8, 16, 32):
            assert all(c["use_dot"] or num_rows <= FMA_MAX_ROWS for c in configs_for(kind, num_rows))
            for out_features, in_features in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
                config = pick_config(kind, num_rows, out_features, in_features)
                assert config in configs_for(kind, num_rows)
                assert config["use_dot"] == (num_rows > FMA_MAX_ROWS)
    dot = next(c for c in CONFIGS["fp8"] if c["use_dot"])
    assert [block_rows(dot, m) for m in (1, 16, 17, 32, 33)] == [16, 16, 32, 32, 32]


def test_pick_config_is_near_the_fastest_measured():
    """Against the H200 measurements: the picked config of each kind, shape and row count is within
    15 % of the fastest config measured there (int4 with group size 128, the engine's default)."""
    measured = json.loads((BENCHMARKS / "quant_gemv-h200.json").read_text())["records"]
    timed = [r for r in measured if r["ok"] and r["config"] and r["kind"] in ("fp8", "int4")]
    timed = [r for r in timed if r["group_size"] in (None, 128)]
    groups = {(r["kind"], r["N"], r["K"], r["M"]) for r in timed}
    assert len(groups) == 16  # 2 kinds x 4 shapes x M in (1, 32)
    for kind, n, k, m in groups:
        runs = [r for r in timed if (r["kind"], r["N"], r["K"], r["M"]) == (kind, n, k, m)]
        fastest = min(r["us"] for r in runs)
        picked = pick_config(kind, m, n, k)
        (run,) = [r for r in runs if r["config"] == picked]
        assert run["us"] <= 1.15 * fastest, (kind, n, k, m, run["us"], fastest)


# ---- real shapes on the GPU ------------------------------------------------------------------------

LLAMA_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down


@pytest.mark.cuda
@pytest.mark.parametrize("out_features,in_features", LLAMA_8B_SHAPES, ids=str)
@pytest.mark.parametrize("num_rows", [1, 4, 16, 32])
def test_cuda_fp8_every_config_real_shapes(out_features, in_features, num_rows):
    x, w, _ = _inputs(num_rows, out_features, in_features, torch.bfloat16, seed=num_rows, device="cuda")
    wq = quantize_fp8_weight(w)
    expected = _reference(x, dequantize_fp8(wq, torch.float64))
    for config in configs_for("fp8", num_rows):
        _assert_close(fp8_gemv(x, wq, config=config), x, expected, rtol=2 * BF16_RTOL, atol_rms=2.0**-6)


@pytest.mark.cuda
@pytest.mark.parametrize("out_features,in_features", LLAMA_8B_SHAPES, ids=str)
@pytest.mark.parametrize("num_rows", [1, 4, 16, 32])
def test_cuda_int4_every_config_real_shapes(out_features, in_features, num_rows):
    x, w, _ = _inputs(num_rows, out_features, in_features, torch.bfloat16, seed=num_rows, device="cuda")
    group_size = 64 if num_rows == 4 else 128
    q = quantize_int4_weight(w.bfloat16(), group_size, refine_steps=0)
    expected = _reference(x, dequantize_int4(q, torch.float32))
    for config in configs_for("int4", num_rows):
        _assert_close(int4_gemv(x, q, config=config), x, expected, rtol=2 * BF16_RTOL, atol_rms=2.0**-6)


@pytest.mark.cuda
def test_cuda_linear_dispatch():
    """fp8_linear / int4_linear take the Triton kernels for small batches and the old paths past them."""
    from adaptserve.kernels.quant import fp8, int4
    from adaptserve.kernels.quant.small_batch import TRITON_GEMV_MAX_ROWS

    big_rows = TRITON_GEMV_MAX_ROWS + 1
    big, w, bias = _inputs(big_rows, 1024, 2048, torch.bfloat16, seed=9, device="cuda", bias=True)
    q = quantize_int4_weight(w.bfloat16())
    small = big[:4].reshape(2, 2, 2048)  # [B, T, K]
    assert torch.equal(int4.int4_linear(small, q, bias), int4_gemv(big[:4], q, bias).view(2, 2, 1024))
    assert torch.equal(int4.int4_linear(big, q, bias), int4.int4_dequant_linear(big, q, bias))
    if torch.cuda.get_device_capability() >= (8, 9):  # Triton's e4m3 type needs sm_89
        wq = quantize_fp8_weight(w)
        assert torch.equal(fp8.fp8_linear(small, wq, bias), fp8_gemv(big[:4], wq, bias).view(2, 2, 1024))
        assert torch.equal(fp8.fp8_linear(big, wq, bias), fp8.fp8_w8a8_linear(big, wq, bias))


@pytest.mark.cuda
def test_cuda_graph_capture_split_k():
    x, w, bias = _inputs(2, 4096, 4096, torch.bfloat16, seed=12, device="cuda", bias=True)
    q = quantize_int4_weight(w.bfloat16(), refine_steps=0)
    config = next(c for c in CONFIGS["int4"] if c["split_k"] > 1)
    resources: dict = {}
    int4_gemv(x, q, bias, config=config, resources=resources)  # compile outside the capture
    assert resources["num_warps"] == config["num_warps"] and resources["regs"] > 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int4_gemv(x, q, bias, config=config)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    expected = _reference(x, dequantize_int4(q, torch.float32), bias)
    _assert_close(out, x, expected, rtol=2 * BF16_RTOL, atol_rms=2.0**-6)
