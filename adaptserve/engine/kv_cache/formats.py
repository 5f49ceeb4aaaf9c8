"""KV-cache formats and the byte layout of one block in each: plain numbers both the block pool (how
many blocks of a format fit in a chunk) and the kernels (where a block's bytes are) read.

A block holds `block_size` tokens of one layer's keys and values. Its bytes are four regions:
[K data][V data][K scales][V scales]. Data is per token, per KV head, per channel:

- `bf16`: the model's own dtype (bf16 on a GPU, fp32 on a CPU), no scales;
- `fp8`: e4m3, one fp16 scale per token and head (amax / 448);
- `int8`: symmetric, one fp16 scale per token and head (amax / 127);
- `int4`: asymmetric, two codes a byte (even channel in the low nibble), an fp16 scale and an fp16
  minimum per token, head and group of `int4_group_size` channels.

Every scale is per token, so a token is quantized alone when it is written: a block fills a token at
a time in any format. Blocks live in chunks of memory (see chunk_pool.py); a chunk holds blocks of one
format, `chunk_bytes // block_bytes` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_FORMATS = ("bf16", "fp8", "int8", "int4")  # high to low precision; "bf16" = the model's own dtype
FORMAT_CODES = {name: code for code, name in enumerate(KV_FORMATS)}  # the chunk-format table's values
SCALE_DTYPE = torch.float16
SCALE_BYTES = 2


@dataclass(frozen=True)
class FormatLayout:
    """Where the four regions of one block sit, in bytes from the block's start."""

    name: str
    code: int
    data_bytes: int  # one of K or V: block_size * num_kv_heads * bytes per head vector
    scale_bytes: int  # one of K or V
    scales_per_head: int  # fp16 values per token and head (0, 1, or 2 per int4 group)

    @property
    def block_bytes(self) -> int:
        return 2 * (self.data_bytes + self.scale_bytes)

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
        return 2 * self.data_bytes + self.scale_bytes


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
            "int4": self.head_dim // 2,
        }[name]
        scales = {"bf16": 0, "fp8": 1, "int8": 1, "int4": 2 * self.head_dim // self.int4_group_size}[name]
        return FormatLayout(
            name=name,
            code=FORMAT_CODES[name],
            data_bytes=tokens_heads * head_bytes,
            scale_bytes=tokens_heads * scales * SCALE_BYTES,
            scales_per_head=scales,
        )

    def formats(self) -> list[FormatLayout]:
        return [self.format(name) for name in KV_FORMATS]

    def bytes_per_token(self, name: str) -> float:
        """One layer's K and V bytes per token in format `name` (scales included)."""
        return self.format(name).block_bytes / self.block_size
