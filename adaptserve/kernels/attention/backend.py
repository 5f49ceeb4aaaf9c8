"""What the model calls on its attention backend (the runner passes a TunedAttention; tests may pass
the torch reference or the FlexAttention backend directly)."""

from __future__ import annotations

from typing import Protocol

import torch

from adaptserve.kernels.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def rope_and_write_kv(self, q, k, v, rope, k_cache, v_cache, meta: AttentionMetadata): ...

    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...
