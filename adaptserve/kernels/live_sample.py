"""A live shape to tune on, and how to launch a kernel variant on it (for the autotuner).

A `Sample` is one engine step's attention metadata (copied) over the live layer-0 KV cache (shared,
read only); `sample_inputs` adds random queries. `launch` runs a variant and returns the rows of its
op; `compile_ahead` compiles what a launch would run without launching it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from adaptserve.kernels.attention.metadata import AttentionMetadata, PrefillSequence
from adaptserve.kernels.registry import KernelVariant


@dataclass
class Sample:
    """A live shape to time on: the step's metadata (copied) and layer-0 caches (shared, read only)."""

    meta: AttentionMetadata
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    num_heads: int
    step: int


def runs_on(variant: KernelVariant, sample: Sample) -> bool:
    return sample.k_cache.device.type in variant.devices


def sample_inputs(sample: Sample) -> dict[str, Any]:
    """Random queries over the live cache; k and v are this step's rows read back from the cache."""
    meta = sample.meta
    num_tokens = meta.slot_mapping.shape[0]
    num_kv_heads, head_dim = sample.k_cache.shape[2], sample.k_cache.shape[3]
    generator = torch.Generator(device=sample.k_cache.device).manual_seed(sample.step)
    q = torch.randn(
        num_tokens, sample.num_heads, head_dim, generator=generator, device=sample.k_cache.device
    ).to(sample.k_cache.dtype)  # [T, H, D]
    flat_k = sample.k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = sample.v_cache.view(-1, num_kv_heads, head_dim)
    return {
        "q": q,
        "k": flat_k[meta.slot_mapping],  # [T, KVH, D]
        "v": flat_v[meta.slot_mapping],  # [T, KVH, D]
        "k_cache": sample.k_cache,
        "v_cache": sample.v_cache,
        "meta": meta,
        "scale": head_dim**-0.5,
    }


def compile_ahead(variant: KernelVariant, args: tuple) -> None:
    """The compiler on CUDA: Triton's JIT warmup of what `variant.run(*args)` would launch, on the
    arguments' device. It compiles into Triton's in-memory cache and launches nothing, so it does not
    touch the engine's streams."""
    device = args[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        variant.warmup(*args)


def run_args(inputs: dict[str, Any], out: torch.Tensor) -> tuple:
    """A variant's run (and warmup) arguments, less `resources`."""
    keys = ("q", "k", "v", "k_cache", "v_cache", "meta", "scale")
    return (*(inputs[key] for key in keys), out)


def launch(variant: KernelVariant, inputs: dict[str, Any], resources: dict | None = None) -> torch.Tensor:
    """Run one variant -> the rows of its op (decode rows, or the prefill rows)."""
    meta: AttentionMetadata = inputs["meta"]
    out = torch.zeros_like(inputs["q"])  # [T, H, D]
    variant.run(*run_args(inputs, out), resources)
    if variant.op == "decode_attention":
        return out[: meta.num_decode_tokens]
    return out[meta.num_decode_tokens :]


def copy_meta(meta: AttentionMetadata) -> AttentionMetadata:
    """A copy that the next step's buffers (CUDA-graph inputs are overwritten in place) cannot change."""

    def clone(t):
        return None if t is None else t.clone()

    return AttentionMetadata(
        slot_mapping=meta.slot_mapping.clone(),
        num_decode_tokens=meta.num_decode_tokens,
        prefills=[PrefillSequence(p.query_start, p.query_len, p.context_len) for p in meta.prefills],
        block_table=clone(meta.block_table),
        context_lens=clone(meta.context_lens),
        query_start_loc=clone(meta.query_start_loc),
        max_query_len=meta.max_query_len,
        max_context_len=meta.max_context_len,
    )
