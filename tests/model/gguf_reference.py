"""Reference GGUF dequantizers written from ggml's C code (ggml-quants.c dequantize_row_*), kept apart
from the gguf package so the loader is checked against an independent decoder."""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q


def _f16(raw: np.ndarray) -> np.ndarray:
    """[n, 2] little-endian bytes -> [n, 1] float32."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _u32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<u4").astype(np.int64)


def _scale_min_k4(j: int, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4: the j-th 6-bit scale and min of a K-quant super-block; s: [n, 12] uint8."""
    s = s.astype(np.int64)
    if j < 4:
        return s[:, j : j + 1] & 63, s[:, j + 4 : j + 5] & 63
    sc = (s[:, j + 4 : j + 5] & 0xF) | ((s[:, j - 4 : j - 3] >> 6) << 4)
    m = (s[:, j + 4 : j + 5] >> 4) | ((s[:, j : j + 1] >> 6) << 4)
    return sc, m


def reference_dequantize(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """[rows, bytes per row] uint8 -> [rows, cols] float32, following ggml's reference C loops."""
    rows = raw.shape[0]
    if qtype == Q.F32:
        return np.ascontiguousarray(raw).view(np.float32).reshape(rows, -1)
    if qtype == Q.F16:
        return np.ascontiguousarray(raw).view(np.float16).astype(np.float32).reshape(rows, -1)
    if qtype == Q.BF16:
        return (
            (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16)
            .view(np.float32)
            .reshape(rows, -1)
        )
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    b = raw.reshape(-1, type_size)  # [n_blocks, type_size]
    y = np.zeros((b.shape[0], block_size), dtype=np.float32)
    if qtype == Q.Q8_0:
        y[:] = b[:, 2:34].view(np.int8).astype(np.float32) * _f16(b[:, 0:2])
    elif qtype in (Q.Q4_0, Q.Q4_1):
        d = _f16(b[:, 0:2])
        qs = b[:, 2:18] if qtype == Q.Q4_0 else b[:, 4:20]
        lo, hi = (qs & 0xF).astype(np.int64), (qs >> 4).astype(np.int64)
        if qtype == Q.Q4_0:
            y[:, :16], y[:, 16:] = (lo - 8) * d, (hi - 8) * d
        else:
            m = _f16(b[:, 2:4])
            y[:, :16], y[:, 16:] = lo * d + m, hi * d + m
    elif qtype in (Q.Q5_0, Q.Q5_1):
        d = _f16(b[:, 0:2])
        m, qh, qs = (
            (None, _u32(b[:, 2:6]), b[:, 6:22])
            if qtype == Q.Q5_0
            else (_f16(b[:, 2:4]), _u32(b[:, 4:8]), b[:, 8:24])
        )
        for j in range(16):
            xh_0 = ((qh[:, 0] >> j) << 4) & 0x10
            xh_1 = (qh[:, 0] >> (j + 12)) & 0x10
            x0 = (qs[:, j].astype(np.int64) & 0x0F) | xh_0
            x1 = (qs[:, j].astype(np.int64) >> 4) | xh_1
            if qtype == Q.Q5_0:
                y[:, j], y[:, j + 16] = (x0 - 16) * d[:, 0], (x1 - 16) * d[:, 0]
            else:
                y[:, j], y[:, j + 16] = x0 * d[:, 0] + m[:, 0], x1 * d[:, 0] + m[:, 0]
    elif qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin, scales = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16]
        qh, ql = (None, b[:, 16:144]) if qtype == Q.Q4_K else (b[:, 16:48].astype(np.int64), b[:, 48:176])
        u1, u2 = 1, 2
        for j in range(4):  # 64 values per step: two sub-blocks of 32 sharing 32 bytes of nibbles
            sc1, m1 = _scale_min_k4(2 * j, scales)
            sc2, m2 = _scale_min_k4(2 * j + 1, scales)
            d1, min1 = d * sc1.astype(np.float32), dmin * m1.astype(np.float32)
            d2, min2 = d * sc2.astype(np.float32), dmin * m2.astype(np.float32)
            q = ql[:, 32 * j : 32 * j + 32].astype(np.int64)
            lo, hi = q & 0xF, q >> 4
            if qh is not None:
                lo, hi = lo + np.where(qh & u1, 16, 0), hi + np.where(qh & u2, 16, 0)
                u1, u2 = u1 << 2, u2 << 2
            y[:, 64 * j : 64 * j + 32] = d1 * lo.astype(np.float32) - min1
            y[:, 64 * j + 32 : 64 * j + 64] = d2 * hi.astype(np.float32) - min2
    elif qtype == Q.Q6_K:
        ql, qh = b[:, 0:128].astype(np.int64), b[:, 128:192].astype(np.int64)
        sc, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
        for n in range(2):  # two halves of 128 values
            L, H, S = ql[:, 64 * n : 64 * n + 64], qh[:, 32 * n : 32 * n + 32], sc[:, 8 * n : 8 * n + 8]
            for l in range(32):  # noqa: E741
                is_ = l // 16
                q1 = ((L[:, l] & 0xF) | (((H[:, l] >> 0) & 3) << 4)) - 32
                q2 = ((L[:, l + 32] & 0xF) | (((H[:, l] >> 2) & 3) << 4)) - 32
                q3 = ((L[:, l] >> 4) | (((H[:, l] >> 4) & 3) << 4)) - 32
                q4 = ((L[:, l + 32] >> 4) | (((H[:, l] >> 6) & 3) << 4)) - 32
                base = 128 * n + l
                for offset, q, s in ((0, q1, 0), (32, q2, 2), (64, q3, 4), (96, q4, 6)):
                    y[:, base + offset] = d[:, 0] * S[:, is_ + s] * q.astype(np.float32)
    else:
        raise AssertionError(f"no reference decoder for {qtype.name}")
    return y.reshape(rows, -1)
