"""KV-cache formats and the byte layout of one block in each: plain numbers both the block pool (how
many blocks of a format fit in a chunk) and the kernels (where a block's bytes are) read.

A block holds `block_size` tokens of one layer's keys and values. Its bytes are four regions:
[K data][V data][K scales][V scales]. Data is per token, per KV head, per channel:

- `bf16`: the model's own dtype (bf16 on a GPU, fp32 on a CPU), no scales;
- `fp8`: e4m3, one fp16 scale per token and head (amax / 448);
- `int8`: symmetric, one fp16 scale per token and head (amax / 127);
- `int4k` ("int4, keys per channel", KIVI, Liu et al. 2024): keys int4 with an fp16 scale and fp16
  minimum per block, head and channel (quantized along the block's tokens, so an outlier channel
  sets only its own step); values exactly as `int4`. K scales: per head, D scales then D minimums;
- `int4`: asymmetric, two codes a byte (even channel in the low nibble), an fp16 scale and an fp16
  minimum per token, head and group of `int4_group_size` channels.

Every scale but int4k's key scales is per token, so a token is quantized alone when it is written: a
block of those formats fills a token at a time. int4k's key scales need the whole block, so int4k is
a whole-block format: blocks only enter it full, requantized from another format (the engine's cold
blocks), and no token is ever written into one. New tokens go to `token_format(name)`: the format
itself, or for int4k its per-token stand-in int8 (KIVI's full-precision window of recent tokens,
at int8's 2 % error rather than int4's 27 %). Blocks live in chunks of memory (see chunk_pool.py); a
chunk holds blocks of one format, `chunk_bytes // block_bytes` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_FORMATS = ("bf16", "fp8", "int8", "int4k", "int4")  # high to low precision; "bf16" = the model's dtype
WHOLE_BLOCK_FORMATS = {"int4k": "int8"}  # formats written only as whole blocks -> their per-token stand-in
FORMAT_CODES = {name: code for code, name in enumerate(KV_FORMATS)}  # the chunk-format table's values
SCALE_DTYPE = torch.float16
SCALE_BYTES = 2


@dataclass(frozen=True)
class FormatLayout:
    """Where the four regions of one block sit, in bytes from the block's start."""

    name: str
    code: int
    data_bytes: int  # one of K or V: block_size * num_kv_heads * bytes per head vector
    k_scale_bytes: int  # K's scales: per token (or, int4k, per head and channel) fp16 values
    v_scale_bytes: int  # V's scales, per token

    @property
    def block_bytes(self) -> int:
        return 2 * self.data_bytes + self.k_scale_bytes + self.v_scale_bytes

    @property
    def whole_block(self) -> bool:
        """Whether blocks of this format are only written whole (never a token at a time)."""
        return self.name in WHOLE_BLOCK_FORMATS

    @property
    def k_data(self) -> int:
        return 0

    @property
    def v_data(self) -> int:
        return self.data_bytes

    @property
    def k_scales(self) -> int:
        return 2 * self.data_bytes

    @property
    def v_scales(self) -> int:
        return 2 * self.data_bytes + self.k_scale_bytes


@dataclass(frozen=True)
class KVLayout:
    """Block geometry of one model's KV cache, and each format's byte layout."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    native_dtype: torch.dtype
    int4_group_size: int = 64

    def __post_init__(self) -> None:
        group = self.int4_group_size
        if group < 2 or group % 2 or self.head_dim % group:
            raise ValueError(
                f"cache.kv_int4_group_size={group} must be even and divide head_dim={self.head_dim}"
            )

    def format(self, name: str) -> FormatLayout:
        if name not in FORMAT_CODES:
            raise ValueError(f"unknown KV format {name!r}; known: {KV_FORMATS}")
        tokens_heads = self.block_size * self.num_kv_heads
        native = torch.empty((), dtype=self.native_dtype).element_size()
        head_bytes = {
            "bf16": self.head_dim * native,
            "fp8": self.head_dim,
            "int8": self.head_dim,
            "int4k": self.head_dim // 2,
            "int4": self.head_dim // 2,
        }[name]
        int4_scales = 2 * self.head_dim // self.int4_group_size  # (scale, min) per group
        scales = {"bf16": 0, "fp8": 1, "int8": 1, "int4k": int4_scales, "int4": int4_scales}[name]
        v_scale_bytes = tokens_heads * scales * SCALE_BYTES
        # int4k keys: (scale, min) per head and channel, once per block
        k_scale_bytes = (
            self.num_kv_heads * 2 * self.head_dim * SCALE_BYTES if name == "int4k" else v_scale_bytes
        )
        return FormatLayout(
            name=name,
            code=FORMAT_CODES[name],
            data_bytes=tokens_heads * head_bytes,
            k_scale_bytes=k_scale_bytes,
            v_scale_bytes=v_scale_bytes,
        )

    def formats(self) -> list[FormatLayout]:
        return [self.format(name) for name in KV_FORMATS]

    def bytes_per_token(self, name: str) -> float:
        """One layer's K and V bytes per token in format `name` (scales included)."""
        return self.format(name).block_bytes / self.block_size


def token_format(name: str) -> str:
    """The format new tokens are written in when `name` is the KV write format: `name` itself, or a
    whole-block format's per-token stand-in (int4k -> int8)."""
    if name not in FORMAT_CODES:
        raise ValueError(f"unknown KV format {name!r}; known: {KV_FORMATS}")
    return WHOLE_BLOCK_FORMATS.get(name, name)
