"""Rotary position embeddings in Hugging Face's rotate-half layout, with Llama-3 and linear scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, after the model's rope scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    return _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Holds cos/sin tables for every position; `lookup(positions)` is done once per step."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        device: torch.device | None = None,
    ):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling).to(device)  # [D/2]
        positions = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def context(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeContext:
        return RopeContext(positions, dtype, self.cos_table, self.sin_table)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos_table[positions].to(dtype)  # [T, D]
        sin = self.sin_table[positions].to(dtype)  # [T, D]
        return cos[:, None, :], sin[:, None, :]  # [T, 1, D] to broadcast over heads


@dataclass
class RopeContext:
    """One step's rotary inputs: the positions and the tables; the per-token cos/sin rows are looked
    up once, on first use (a fused kernel reads the tables directly and never needs them)."""

    positions: torch.Tensor  # [T]
    dtype: torch.dtype
    cos_table: torch.Tensor  # [P, D] float32
    sin_table: torch.Tensor  # [P, D] float32
    _rows: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def lookup(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, 1, D] in the model dtype."""
        if self._rows is None:
            cos = self.cos_table[self.positions].to(self.dtype)  # [T, D]
            sin = self.sin_table[self.positions].to(self.dtype)  # [T, D]
            self._rows = (cos[:, None, :], sin[:, None, :])
        return self._rows


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, heads, D]
    return x * cos + rotated * sin
