"""Attention backends register under a name; the runner asks for one by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from adaptserve.kernels.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

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


_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _FACTORIES[name] = factory


def get_backend(name: str) -> AttentionBackend:
    if name not in _FACTORIES:
        raise ValueError(f"unknown attention backend {name!r}; registered: {sorted(_FACTORIES)}")
    return _FACTORIES[name]()


def _register_builtin() -> None:
    from adaptserve.kernels.attention.torch_ref import TorchReferenceAttention

    register_backend(TorchReferenceAttention.name, TorchReferenceAttention)


_register_builtin()
