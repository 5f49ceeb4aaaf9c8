"""KV head-vector quantization per format: round-trip error bounds, zero vectors, int4 packing, the
fp16 scales being the ones used, and unknown formats.

Error bounds used below (s = the stored fp16 scale of a token and head, or of an int4 group):
- int8: codes are round(x / s) with s = fp16(amax / 127), so |error| <= s / 2 (the amax element may
  land a little past 127 when fp16 rounds s down: clamping it costs about 2^-11 * 127 code units).
- int4: codes are round((x - m) / s) with m = fp16(group min), s = fp16((max - m) / 15): again
  |error| <= s / 2, plus the fp16 rounding of m that clamping at code 0 may add (2^-11 of |min|).
- fp8 (e4m3, 3 mantissa bits): in the normal range (|x| / s >= 2^-6) round-to-nearest errs by at most
  2^-4 of |x|; below it the subnormal grid's spacing is 2^-9, so the error is at most 2^-10 * s.
- relative Frobenius error on unit normal data: int8 about 0.0065, fp8 about 0.026, int4 about 0.09
  with groups of 64 (0.08 with 32); a few outlier channels (10x) inflate every per-token scale.
- int4k keys (per block, head and channel, over the block's 16 tokens): codes round((x - m) / s) with
  m, s per channel, so again |error| <= s / 2; about 0.065 on unit normal data (16 values span less
  than 64), and outlier channels cost the other channels nothing.
"""

from __future__ import annotations

import pytest
import torch

from adaptserve.engine.kv_cache.formats import SCALE_DTYPE
from adaptserve.kernels.kv_quant import (
    FP8_MAX,
    STORAGE_DTYPES,
    dequantize,
    dequantize_key_blocks,
    quantize,
    quantize_key_blocks,
    value_format,
)

N, H, D = 64, 4, 128
OUTLIER_CHANNELS = [5, 77, 100]


def _normal(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, H, D, generator=g)  # [N, H, D]


def _with_outliers(seed: int = 0) -> torch.Tensor:
    """Unit normal data whose channels OUTLIER_CHANNELS are 10x larger (as keys often have)."""
    x = _normal(seed)
    x[..., OUTLIER_CHANNELS] *= 10.0
    return x  # [N, H, D]


def _round_trip(x: torch.Tensor, name: str, group_size: int = 64) -> torch.Tensor:
    data, scales = quantize(x, name, group_size, torch.float32)
    return dequantize(data, scales, name, group_size, torch.float32)


def _rel_frobenius(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("native_dtype", [torch.float32, torch.bfloat16])
def test_bf16_is_the_native_dtype_and_exact_in_it(native_dtype):
    x = _with_outliers()
    data, scales = quantize(x, "bf16", 64, native_dtype)
    assert scales is None
    assert data.dtype == native_dtype
    assert torch.equal(data, x.to(native_dtype))
    out = dequantize(data, None, "bf16", 64, torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, x.to(native_dtype).float())


@pytest.mark.parametrize(
    ("name", "group_size", "max_error"),
    [("int8", 64, 0.01), ("fp8", 64, 0.04), ("int4", 64, 0.12), ("int4", 32, 0.12)],
)
def test_relative_error_on_normal_data(name, group_size, max_error):
    x = _normal()
    assert _rel_frobenius(_round_trip(x, name, group_size), x) < max_error


@pytest.mark.parametrize(
    ("name", "group_size", "max_error"),
    # int8 and int4 lose more here: the outliers set the step of every other channel in their vector
    [("int8", 64, 0.025), ("fp8", 64, 0.04), ("int4", 64, 0.18), ("int4", 32, 0.12)],
)
def test_relative_error_with_outlier_channels(name, group_size, max_error):
    x = _with_outliers()
    assert _rel_frobenius(_round_trip(x, name, group_size), x) < max_error


@pytest.mark.parametrize("make", [_normal, _with_outliers])
def test_int4_smaller_groups_err_less(make):
    x = make()
    error_64 = _rel_frobenius(_round_trip(x, "int4", 64), x)
    error_32 = _rel_frobenius(_round_trip(x, "int4", 32), x)
    error_16 = _rel_frobenius(_round_trip(x, "int4", 16), x)
    assert error_16 < error_32 < error_64


@pytest.mark.parametrize("make", [_normal, _with_outliers])
def test_int8_error_within_half_a_step(make):
    x = make()
    data, scales = quantize(x, "int8", 64, torch.float32)
    assert data.dtype == torch.int8 and data.shape == (N, H, D)
    assert scales.dtype == SCALE_DTYPE and scales.shape == (N, H, 1)
    assert data.min() >= -127
    error = (dequantize(data, scales, "int8", 64, torch.float32) - x).abs()  # [N, H, D]
    assert (error <= (0.5 + 1e-4) * scales.float()).all()


@pytest.mark.parametrize("make", [_normal, _with_outliers])
@pytest.mark.parametrize("group_size", [64, 32])
def test_int4_error_within_half_a_step(make, group_size):
    x = make()
    data, scales = quantize(x, "int4", group_size, torch.float32)
    groups = D // group_size
    assert data.dtype == torch.uint8 and data.shape == (N, H, D // 2)
    assert scales.dtype == SCALE_DTYPE and scales.shape == (N, H, 2 * groups)
    step = scales.float().view(N, H, groups, 2)[..., 0]  # [N, H, G]
    error = (dequantize(data, scales, "int4", group_size, torch.float32) - x).abs()  # [N, H, D]
    error = error.view(N, H, groups, group_size).amax(dim=-1)  # [N, H, G]
    assert (error <= 0.501 * step).all()


@pytest.mark.parametrize("make", [_normal, _with_outliers])
def test_fp8_error_within_e4m3_rounding(make):
    x = make()
    data, scales = quantize(x, "fp8", 64, torch.float32)
    assert data.dtype == torch.float8_e4m3fn and data.shape == (N, H, D)
    assert scales.dtype == SCALE_DTYPE and scales.shape == (N, H, 1)
    s = scales.float().expand_as(x)  # [N, H, D]
    error = (dequantize(data, scales, "fp8", 64, torch.float32) - x).abs()  # [N, H, D]
    normal = x.abs() >= 2.0**-6 * s
    assert normal.any() and (~normal).any()
    assert (error <= 2.0**-4 * x.abs() * (1 + 1e-5))[normal].all()
    assert (error <= (2.0**-10 + 2.0**-20) * s)[~normal].all()


@pytest.mark.parametrize("name", ["fp8", "int8", "int4"])
def test_zero_vectors_round_trip_to_zero(name):
    x = _normal()
    x[3] = 0.0  # a whole token
    x[7, 1] = 0.0  # one head of a token
    x[9, 2, :32] = 0.0  # one int4 group of 32 (the rest of the head is not zero)
    data, scales = quantize(x, name, 32, torch.float32)
    assert torch.isfinite(scales.float()).all() and (scales.float()[3] >= 0).all()
    out = dequantize(data, scales, name, 32, torch.float32)  # [N, H, D]
    assert torch.isfinite(out).all()
    assert torch.equal(out[3], torch.zeros(H, D))
    assert torch.equal(out[7, 1], torch.zeros(D))
    assert torch.equal(out[9, 2, :32], torch.zeros(32))
    assert _rel_frobenius(out, x) < 0.12


def test_int4_constant_group_round_trips_exactly():
    x = torch.full((1, 1, 64), -0.75)  # [1, 1, D]; exact in fp16, so the stored minimum is exact
    x[0, 0, 32:] = 2.5
    assert torch.equal(_round_trip(x, "int4", 32), x)


def test_int4_codes_and_packing_of_a_hand_computed_vector():
    # group 0: min -1, max 14 -> scale 1, codes (x + 1) / 1 = [0, 15, 4, 7.4 -> 7]
    # group 1: min 0, max 7.5 -> scale 0.5, codes x / 0.5 = [0, 15, 7.2 -> 7, 2]
    x = torch.tensor([-1.0, 14.0, 3.0, 6.4, 0.0, 7.5, 3.6, 1.0]).view(1, 1, 8)  # [1, 1, D]
    data, scales = quantize(x, "int4", 4, torch.float32)
    # two codes a byte, even channel in the low nibble: 0 | 15 << 4, 4 | 7 << 4, 0 | 15 << 4, 7 | 2 << 4
    assert data.tolist() == [[[240, 116, 240, 39]]]
    assert scales.dtype == SCALE_DTYPE
    assert scales.tolist() == [[[1.0, -1.0, 0.5, 0.0]]]  # (scale, min) per group
    out = dequantize(data, scales, "int4", 4, torch.float32)
    assert out.tolist() == [[[-1.0, 14.0, 3.0, 6.0, 0.0, 7.5, 3.5, 1.0]]]


@pytest.mark.parametrize("group_size", [64, 32])
def test_int4_codes_map_min_to_0_and_max_to_15(group_size):
    x = _with_outliers()
    data, _ = quantize(x, "int4", group_size, torch.float32)
    codes = torch.stack([data & 0xF, data >> 4], dim=-1).view(N, H, D // group_size, group_size)
    groups = x.view(N, H, D // group_size, group_size)  # [N, H, G, gs]
    assert int(codes.max()) <= 15
    assert (codes.gather(-1, groups.argmin(dim=-1, keepdim=True)) == 0).all()
    assert (codes.gather(-1, groups.argmax(dim=-1, keepdim=True)) == 15).all()


def test_int8_hand_computed_vector_uses_the_fp16_scale():
    # 2.54 / 127 = 0.02 is not an fp16 value: it is stored as 0.0200042724609375. Dividing by the
    # stored scale makes -1.27 code -63.49 -> -63; dividing by 0.02 would give -63.5 -> -64.
    x = torch.tensor([2.54, -1.27, 0.3, 0.0]).view(1, 1, 4)  # [1, 1, D]
    data, scales = quantize(x, "int8", 64, torch.float32)
    assert scales.dtype == SCALE_DTYPE and scales.item() == 0.0200042724609375
    assert data.tolist() == [[[127, -63, 15, 0]]]
    out = dequantize(data, scales, "int8", 64, torch.float32)
    assert out.tolist() == [[[v * 0.0200042724609375 for v in (127.0, -63.0, 15.0, 0.0)]]]


@pytest.mark.parametrize(("name", "limit"), [("int8", 127.0), ("fp8", FP8_MAX)])
def test_stored_scales_are_the_ones_used(name, limit):
    x = _with_outliers()
    data, scales = quantize(x, name, 64, torch.float32)
    s = scales.float()  # [N, H, 1]
    amax = x.abs().amax(dim=-1, keepdim=True)  # [N, H, 1]
    assert (torch.abs(s - amax / limit) <= 2.0**-11 * amax / limit).all()  # fp16 rounding of amax / limit
    scaled = (x / s).clamp(-limit, limit)  # [N, H, D]
    expected = scaled.round().to(torch.int8) if name == "int8" else scaled.to(torch.float8_e4m3fn)
    assert torch.equal(data.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(dequantize(data, scales, name, 64, torch.float32), data.float() * s)


@pytest.mark.parametrize("group_size", [64, 32])
def test_int4_stored_scale_and_min_are_the_ones_used(group_size):
    x = _with_outliers()
    groups = x.view(N, H, D // group_size, group_size)  # [N, H, G, gs]
    data, scales = quantize(x, "int4", group_size, torch.float32)
    pairs = scales.float().view(N, H, D // group_size, 2)  # [N, H, G, 2]
    step, low = pairs[..., :1], pairs[..., 1:]  # [N, H, G, 1]
    assert torch.equal(low, groups.amin(dim=-1, keepdim=True).to(SCALE_DTYPE).float())
    span = groups.amax(dim=-1, keepdim=True) - low
    assert (torch.abs(step - span / 15) <= 2.0**-11 * span / 15).all()
    codes = ((groups - low) / step).round().clamp(0, 15).to(torch.uint8).view(N, H, D)
    assert torch.equal(data, codes[..., 0::2] | (codes[..., 1::2] << 4))
    out = dequantize(data, scales, "int4", group_size, torch.float32).view(groups.shape)
    assert torch.equal(out, codes.view(groups.shape).float() * step + low)


def test_storage_dtypes_cover_the_quantized_formats():
    x = _normal()[:2]
    for name, dtype in STORAGE_DTYPES.items():
        if name == "int4k":
            assert quantize_key_blocks(x[None])[0].dtype == dtype
            assert quantize(x, value_format(name), 64, torch.float32)[0].dtype == dtype
        else:
            assert quantize(x, name, 64, torch.float32)[0].dtype == dtype


# ---- int4k: keys per block, head and channel -----------------------------------------------------

BS = 16  # tokens per block


def _key_blocks(x: torch.Tensor) -> torch.Tensor:
    """[N, H, D] tokens as [N / BS, BS, H, D] blocks."""
    return x.view(-1, BS, H, D)


def _key_round_trip(blocks: torch.Tensor) -> torch.Tensor:
    return dequantize_key_blocks(*quantize_key_blocks(blocks), torch.float32)


def test_int4k_refuses_a_token_alone():
    with pytest.raises(ValueError, match="int4k keys are quantized per block"):
        quantize(_normal()[:2], "int4k", 64, torch.float32)
    assert value_format("int4k") == "int4" and value_format("int8") == "int8"


@pytest.mark.parametrize("make", [_normal, _with_outliers])
def test_int4k_keys_error_within_half_a_step_per_channel(make):
    blocks = _key_blocks(make())  # [B, bs, H, D]
    packed, scales = quantize_key_blocks(blocks)
    assert packed.dtype == torch.uint8 and packed.shape == (N // BS, BS, H, D // 2)
    assert scales.dtype == SCALE_DTYPE and scales.shape == (N // BS, H, 2, D)
    step, low = scales.float()[:, None, :, 0], scales.float()[:, None, :, 1]  # [B, 1, H, D] each
    assert torch.equal(low, blocks.amin(dim=1, keepdim=True).to(SCALE_DTYPE).float())
    error = (dequantize_key_blocks(packed, scales, torch.float32) - blocks).abs()  # [B, bs, H, D]
    assert (error <= 0.501 * step + 2.0**-11 * low.abs()).all()
    assert _rel_frobenius(dequantize_key_blocks(packed, scales, torch.float32), blocks) < 0.07


def test_int4k_outlier_channels_cost_the_other_channels_nothing():
    x = _with_outliers()  # [N, H, D]
    others = torch.ones(D, dtype=torch.bool)
    others[OUTLIER_CHANNELS] = False
    per_channel = _key_round_trip(_key_blocks(x)).view(N, H, D)
    per_token = _round_trip(x, "int4", 64)
    baseline = _round_trip(_normal(), "int4", 64)  # per-token int4 without outliers
    error_k = _rel_frobenius(per_channel[..., others], x[..., others])
    error_t = _rel_frobenius(per_token[..., others], x[..., others])
    # per token, each group's step is set by its outlier: the other channels lose several times more
    assert error_t > 3 * error_k
    assert error_k < 0.07 and error_k < _rel_frobenius(baseline, _normal())
    assert _rel_frobenius(per_channel, x) < 0.07  # the outlier channels themselves: 16 values each


def test_int4k_codes_and_scales_of_a_hand_computed_block():
    # one head, two channels, 4 tokens: channel 0 spans -1..14 (scale 1), channel 1 spans 0..7.5 (0.5)
    x = torch.tensor([[-1.0, 0.0], [14.0, 7.5], [3.0, 3.6], [6.4, 1.0]]).view(1, 4, 1, 2)  # [1, bs, H, D]
    packed, scales = quantize_key_blocks(x)
    # codes: channel 0 (x + 1) / 1 = [0, 15, 4, 7.4 -> 7]; channel 1 x / 0.5 = [0, 15, 7.2 -> 7, 2]
    assert packed.view(4).tolist() == [0 | 0 << 4, 15 | 15 << 4, 4 | 7 << 4, 7 | 2 << 4]
    assert scales.tolist() == [[[[1.0, 0.5], [-1.0, 0.0]]]]  # per head: the D scales, then the D minimums
    out = dequantize_key_blocks(packed, scales, torch.float32)
    assert out.view(4, 2).tolist() == [[-1.0, 0.0], [14.0, 7.5], [3.0, 3.5], [6.0, 1.0]]


def test_int4k_constant_channels_round_trip_exactly():
    x = torch.full((1, BS, 2, 4), -0.75)  # [1, bs, H, D]; exact in fp16, so the stored minimum is exact
    x[..., 1, :] = 2.5
    x[..., 3] = 0.0  # an all-zero channel: the scale floor, no NaN
    assert torch.equal(_key_round_trip(x), x)


@pytest.mark.parametrize("name", ["int2", "fp16", ""])
def test_unknown_format_raises(name):
    x = _normal()[:2]
    with pytest.raises(ValueError, match="unknown KV format"):
        quantize(x, name, 64, torch.float32)
    data, scales = quantize(x, "int8", 64, torch.float32)
    with pytest.raises(ValueError, match="unknown KV format"):
        dequantize(data, scales, name, 64, torch.float32)
